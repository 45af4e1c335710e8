"""Hostile and malformed checkpoints: each is refused in one line that names the file, before any weight goes into
a model, and weights_convert.py exits 2 with one `error:` line, no traceback and no output.

Pickles that set attributes on the objects they may build (an OrderedDict whose `items` is theirs, a Parameter
whose `detach` is) are refused by both loaders and what they set is never called; nesting is capped and shared
references cost nothing. Tensors with an empty dimension, too many dimensions, or another rank than the config
is read with are named by key in every layout: CompVis .ckpt and .safetensors, diffusers folder, bundle, CLIP.
Real checkpoints (plain dicts, state_dict() OrderedDicts, Lightning files, Parameters) still load.
"""
import argparse
import collections
import json
import runpy
import shutil
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_sd
from sau.common.state import CheckpointError
from sau.models.clip import CLIPModel
from sau.models.config import TextConfig, VisionConfig
from sau.weights import safe_pickle
from sau.weights.read import read, read_tensor_file
from sau.weights.write import save_model

ROOT = Path(__file__).resolve().parents[1]
UNET = "model.diffusion_model."
FLAG = None  # where write_flag writes; set per test by the `flag` fixture


def write_flag(*args, **kwargs):
    """What a hostile pickle sets as a method. Had anything called it, the flag file would exist."""
    Path(FLAG).write_text("called")


class Reduces:
    """Pickles as the call `reduce` describes, (callable, args[, state[, list items[, dict items]]]): what a
    hand-made pickle can ask for."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


@pytest.fixture
def flag(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "FLAG", tmp_path / "the-pickle-called-it")
    return tmp_path / "the-pickle-called-it"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model as a CompVis state dict, a diffusers folder and a bundle, each made once."""
    root = tmp_path_factory.mktemp("tiny")
    sd = make_tiny_sd(seed=4)
    save_model(sd, root / "compvis.safetensors", to="compvis")
    save_model(sd, root / "diffusers", to="diffusers")
    save_model(sd, root / "bundle")
    return types.SimpleNamespace(state=load_file(root / "compvis.safetensors"), diffusers=root / "diffusers",
                                 bundle=root / "bundle")


def torch_file(path, pickle_bytes):
    """A torch.save zip archive whose pickle is `pickle_bytes`, written opcode by opcode."""
    torch.save(None, path)
    with zipfile.ZipFile(path) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    records[next(name for name in records if name.endswith("/data.pkl"))] = pickle_bytes
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    return path


def convert_cli(monkeypatch, capsys, *args):
    """weights_convert.py run as a script: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "weights_convert.py"), *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "weights_convert.py"), run_name="__main__")
    return done.value.code, capsys.readouterr().err


def assert_refused(path, monkeypatch, capsys, *phrases, named=None):
    """read() refuses `path` in one line naming `named` (default the path) and holding `phrases`; the tool
    prints that line after `error: `, exits 2 and writes nothing. Returns the message."""
    with pytest.raises(CheckpointError) as refused:
        read(path)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and str(named or path) in message, message
    assert all(phrase in message for phrase in phrases), message
    out = Path(path).parent / "converted"
    status, err = convert_cli(monkeypatch, capsys, path, out)
    assert status == 2 and "Traceback" not in err and err.strip().splitlines() == [f"error: {message}"], err
    assert not out.exists()
    return message


# ---------------------------------------------------------------------------------------------------
# Pickles that set attributes on what they may build

def ordered_dict_with_methods(state):
    """An OrderedDict of `state` whose items, get and keys are write_flag (a BUILD of its __dict__)."""
    methods = {"items": write_flag, "get": write_flag, "keys": write_flag}
    return Reduces(collections.OrderedDict, (), methods, None, iter(state.items()))


def parameter_with_methods(tensor):
    """A Parameter whose detach and float are write_flag (the state torch's Parameter rebuild setattrs)."""
    return Reduces(torch._utils._rebuild_parameter_with_state,
                   (tensor, False, collections.OrderedDict(), {"detach": write_flag, "float": write_flag}))


def tensor_with_method(tensor):
    tensor = tensor.clone()
    tensor.float = write_flag  # torch.save keeps Python attributes: the pickle sets it back on load
    return tensor


def hostile(kind, state):
    """(checkpoint object, what calls the pickle's callable on the object torch.load returns)."""
    key = UNET + "out.2.weight"
    if kind == "OrderedDict":
        return ordered_dict_with_methods(state), lambda loaded: loaded.get("global_step")
    if kind == "Parameter":
        return {**state, key: parameter_with_methods(state[key])}, lambda loaded: loaded[key].detach()
    return {**state, key: tensor_with_method(state[key])}, lambda loaded: loaded[key].float()


@pytest.mark.parametrize("kind", ["OrderedDict", "Parameter", "tensor"])
def test_a_pickle_that_sets_methods_is_refused_and_they_are_never_called(tiny, tmp_path, monkeypatch, capsys, flag,
                                                                        kind):
    obj, _ = hostile(kind, tiny.state)
    torch.save(obj, tmp_path / "evil.ckpt")
    # torch's loader refuses write_flag's module, so the safe unpickler reads it: the module is stubbed, and the
    # state that would set the attribute is refused before it is set
    assert_refused(tmp_path / "evil.ckpt", monkeypatch, capsys, "refused, its pickle sets attributes on a",
                   "nothing was run")
    assert not flag.exists()


@pytest.mark.parametrize("kind", ["OrderedDict", "Parameter", "tensor"])
def test_torchs_own_loader_sets_them_and_they_are_still_never_called(tiny, tmp_path, monkeypatch, capsys, flag,
                                                                     kind):
    obj, call = hostile(kind, tiny.state)
    torch.save(obj, tmp_path / "evil.ckpt")
    with torch.serialization.safe_globals([write_flag]):  # a callable torch.load(weights_only=True) lets through
        call(torch.load(tmp_path / "evil.ckpt", weights_only=True))
        assert flag.exists()  # the danger is real: torch hands back an object whose method is the pickle's
        flag.unlink()
        message = assert_refused(tmp_path / "evil.ckpt", monkeypatch, capsys, "nothing was run")
    assert f"sets attributes on a {'Tensor' if kind == 'tensor' else kind} (" in message
    assert not flag.exists()


def test_a_second_build_cannot_call_a_setstate_the_first_one_set(tmp_path, monkeypatch, capsys, flag):
    # Pickle's BUILD calls the object's __setstate__ when it has one: a first BUILD that set one as an attribute
    # would have the second call it. Even with write_flag on the allow-list, nothing is called.
    monkeypatch.setitem(safe_pickle.ALLOWED, (__name__, "write_flag"), write_flag)
    opcodes = (b"\x80\x02" + b"ccollections\nOrderedDict\n)R"  # OrderedDict()
               + b"}X\x0c\x00\x00\x00__setstate__" + f"c{__name__}\nwrite_flag\n".encode() + b"sb"  # BUILD
               + b"}b.")  # BUILD again, then STOP
    torch_file(tmp_path / "evil.ckpt", opcodes)
    assert_refused(tmp_path / "evil.ckpt", monkeypatch, capsys, "sets attributes on a OrderedDict")
    assert not flag.exists()


def test_backward_hooks_in_a_pickle_are_refused(tiny, tmp_path, monkeypatch, capsys):
    tensor = tiny.state[UNET + "out.2.weight"]
    storage = torch.storage.TypedStorage(wrap_storage=tensor.untyped_storage(), dtype=tensor.dtype, _internal=True)
    hooked = Reduces(torch._utils._rebuild_tensor_v2, (storage, 0, tensor.shape, tensor.stride(), False,
                                                       collections.OrderedDict({0: collections.OrderedDict})))
    torch.save({**tiny.state, UNET + "out.2.weight": hooked}, tmp_path / "hooked.ckpt")
    assert_refused(tmp_path / "hooked.ckpt", monkeypatch, capsys, "sets attributes on a Tensor (backward hooks)")


@pytest.mark.parametrize("loader", ["torch's", "the safe unpickler"])
def test_deep_nesting_is_refused_in_one_line(tmp_path, monkeypatch, capsys, loader):
    depth = 100_000  # far past the recursion limit: pickle builds nests without recursing, a reader must too
    innermost = b"" if loader == "torch's" else b"cpytorch_lightning\nModelCheckpoint\na"  # a stub: not torch's
    torch_file(tmp_path / "deep.ckpt", b"\x80\x02" + b"]" * depth + innermost + b"a" * (depth - 1) + b".")
    assert_refused(tmp_path / "deep.ckpt", monkeypatch, capsys, f"nests containers more than "
                   f"{safe_pickle.MAX_DEPTH} deep")


def test_shared_references_are_rebuilt_once(tiny, tmp_path):
    junk = []
    for _ in range(80):  # 2**80 paths through 80 lists: rebuilt path by path, this would never end
        junk = [junk, junk]
    torch.save({"state_dict": tiny.state, "junk": junk}, tmp_path / "shared.ckpt")
    tensors, _ = read_tensor_file(tmp_path / "shared.ckpt")
    assert tensors.keys() == tiny.state.keys()


# ---------------------------------------------------------------------------------------------------
# Real checkpoints still load, as plain data

LIGHTNING = ["pytorch_lightning", "pytorch_lightning.callbacks"]


def lightning_checkpoint(state, monkeypatch):
    """A Lightning-style checkpoint: a callback class as a dict key, a Namespace, optimizer states."""
    for name in LIGHTNING:  # present only while the checkpoint is saved
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = sys.modules[LIGHTNING[-1]]
    module.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    return {"epoch": 3, "global_step": 470000, "state_dict": state,
            "callbacks": {module.ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
            "hyper_parameters": argparse.Namespace(lr=1e-4),
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4}]}]}


def assert_plain(obj, depth=0):
    plain = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)
    assert depth < 20 and (type(obj) in (*plain, dict, list, tuple, torch.Tensor)), type(obj)
    if type(obj) is torch.Tensor:
        assert not vars(obj) and not obj.requires_grad
    children = obj.values() if type(obj) is dict else obj if type(obj) in (list, tuple) else ()
    for child in children:
        assert_plain(child, depth + 1)


@pytest.mark.parametrize("kind", ["plain dict", "state_dict() OrderedDict", "Lightning", "Parameters"])
def test_real_checkpoints_still_load_as_plain_data(tiny, tmp_path, monkeypatch, kind):
    module = torch.nn.Conv2d(4, 8, 3)
    state = {**tiny.state, **{UNET + "extra." + k: v for k, v in module.state_dict().items()}}
    if kind == "state_dict() OrderedDict":
        state = collections.OrderedDict(state)
        state._metadata = module.state_dict()._metadata  # what Module.state_dict() pickles with it
    if kind == "Parameters":
        state = {**state, **{UNET + "extra." + k: v for k, v in module.state_dict(keep_vars=True).items()}}
        assert isinstance(state[UNET + "extra.weight"], torch.nn.Parameter)
    obj = lightning_checkpoint(state, monkeypatch) if kind == "Lightning" else state
    torch.save(obj, tmp_path / "model.ckpt")
    for name in LIGHTNING:
        monkeypatch.delitem(sys.modules, name, raising=False)

    loaded = safe_pickle.load_pickled_checkpoint(tmp_path / "model.ckpt")
    assert_plain(loaded)
    tensors, metadata = read_tensor_file(tmp_path / "model.ckpt")
    assert tensors.keys() == state.keys() and all(torch.equal(tensors[k], v) for k, v in state.items())
    assert metadata == ({"global_step": "470000"} if kind == "Lightning" else {})
    if kind == "Lightning":
        assert loaded["callbacks"] == {} and loaded["hyper_parameters"] is None  # stubs: dropped, never imported
        assert "pytorch_lightning" not in sys.modules


# ---------------------------------------------------------------------------------------------------
# Malformed tensors, in every layout

TEXT = "cond_stage_model.transformer.text_model."
MALFORMED = {  # case -> (file name, key, the tensor put there, what the message says)
    "a .ckpt with a 1-D conv weight": ("model.ckpt", UNET + "input_blocks.0.0.weight", torch.zeros(1152),
                                       f"tensor {UNET}input_blocks.0.0.weight has shape (1152,); SD and CLIP models "
                                       "have it 4-D"),
    "a .ckpt with a 0-channel conv": ("model.ckpt", "first_stage_model.encoder.conv_in.weight", torch.zeros(0, 3, 3, 3),
                                      "tensor first_stage_model.encoder.conv_in.weight has shape (0, 3, 3, 3)"),
    "a .ckpt with a 1-D attention projection": ("model.ckpt", UNET + "middle_block.1.transformer_blocks.0.attn2.to_k"
                                                ".weight", torch.zeros(64), "has shape (64,); SD and CLIP models have "
                                                "it 2-D"),
    "a .safetensors with a 0-size dimension": ("model.safetensors", UNET + "time_embed.0.weight", torch.zeros(0, 3),
                                               f"tensor {UNET}time_embed.0.weight has shape (0, 3); no Stable "
                                               "Diffusion or CLIP weight has an empty dimension or more than 4"),
    "a .safetensors with a 5-D tensor": ("model.safetensors", UNET + "out.0.weight", torch.zeros(1, 1, 1, 1, 32),
                                         "has shape (1, 1, 1, 1, 32)"),
    "a .safetensors with a 3-D token embedding": ("model.safetensors", TEXT + "embeddings.token_embedding.weight",
                                                  torch.zeros(2, 3, 4), "has shape (2, 3, 4); SD and CLIP models have "
                                                  "it 2-D"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_tensor_is_named_with_its_file_and_key(tiny, tmp_path, monkeypatch, capsys, case):
    name, key, tensor, phrase = MALFORMED[case]
    state = {**tiny.state, key: tensor}
    if name.endswith(".ckpt"):
        torch.save({"state_dict": state, "global_step": 1}, tmp_path / name)
    else:
        save_file(state, tmp_path / name)  # no sau config in its metadata: the config is read from the shapes
    assert_refused(tmp_path / name, monkeypatch, capsys, phrase)


def replace_tensor(path, key, tensor):
    """Rewrite a .safetensors file with one tensor replaced."""
    save_file({**load_file(path), key: tensor}, path)


def test_a_diffusers_folder_with_a_1d_weight_is_refused(tiny, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(tiny.diffusers, tmp_path / "diffusers")
    weights = folder / "text_encoder" / "model.safetensors"
    replace_tensor(weights, "text_model.embeddings.token_embedding.weight", torch.zeros(600))
    assert_refused(folder, monkeypatch, capsys, "text_model.embeddings.token_embedding.weight has shape (600,); "
                   "SD and CLIP models have it 2-D", named=weights)


def test_a_diffusers_folder_with_a_misshaped_unet_weight_is_refused(tiny, tmp_path, monkeypatch, capsys):
    # conv_in is not read for the config (unet/config.json gives it): the model built from that config names it
    folder = shutil.copytree(tiny.diffusers, tmp_path / "diffusers")
    replace_tensor(folder / "unet" / "diffusion_pytorch_model.safetensors", "conv_in.weight", torch.zeros(1152))
    assert_refused(folder, monkeypatch, capsys, "weights do not fit: mis-shaped 1",
                   f"{UNET}input_blocks.0.0.weight (1152,) != (32, 4, 3, 3)")


@pytest.mark.parametrize("key, shape, phrase", [
    (UNET + "out.2.weight", (4, 32, 9), "has shape (4, 32, 9); SD and CLIP models have it 4-D"),
    (UNET + "input_blocks.1.0.in_layers.2.weight", (32, 288), "weights do not fit: mis-shaped 1"),
    ("first_stage_model.decoder.conv_out.weight", (3, 0, 3, 3), "has shape (3, 0, 3, 3)"),
])
def test_a_bundle_with_a_wrong_rank_tensor_is_refused(tiny, tmp_path, monkeypatch, capsys, key, shape, phrase):
    bundle = shutil.copytree(tiny.bundle, tmp_path / "bundle")
    replace_tensor(bundle / "model.safetensors", key, torch.zeros(shape))
    assert_refused(bundle, monkeypatch, capsys, phrase)


@pytest.mark.parametrize("unet, phrase", [
    ({"num_heads": 0}, "the config read from it builds no model (integer division or modulo by zero)"),
    ({"norm_groups": 7}, "num_channels (32) must be divisible by num_groups (7)"),
])
def test_a_bundle_config_that_builds_no_model_is_one_line(tiny, tmp_path, monkeypatch, capsys, unet, phrase):
    bundle = shutil.copytree(tiny.bundle, tmp_path / "bundle")
    config = json.loads((bundle / "config.json").read_text())
    config["unet"].update(unet)
    (bundle / "config.json").write_text(json.dumps(config))
    assert_refused(bundle, monkeypatch, capsys, phrase)


def test_a_clip_file_with_a_wrong_rank_patch_embedding_is_refused(tmp_path, monkeypatch, capsys):
    clip = CLIPModel(TextConfig(vocab_size=600, width=64, layers=1, heads=1, mlp_width=128, max_positions=16,
                                projection_dim=16),
                     VisionConfig(image_size=32, patch_size=8, width=64, layers=1, heads=1, mlp_width=128,
                                  projection_dim=16))
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file({**state, "vision_model.embeddings.patch_embedding.weight": torch.zeros(64, 192)},
              tmp_path / "clip.safetensors")
    assert_refused(tmp_path / "clip.safetensors", monkeypatch, capsys,
                   "vision_model.embeddings.patch_embedding.weight has shape (64, 192); SD and CLIP models have it 4-D")
