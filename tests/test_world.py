"""The demo world's training: losses go down, an interrupted run resumes exactly, the shipped models work."""
import json

import pytest
import torch

from sau.world import shapes

from sau.world import train as world
from sau.common.files import DEMO_DIR
from sau.world.classifier import AttributeClassifier, attribute_accuracy, classification_loss
from sau.common.training import Trainer


def classifier_job(run_dir, steps):
    torch.manual_seed(0)
    model = AttributeClassifier(width=8)

    def loss_fn(step):
        images, _, attributes = shapes.batch(32, seed=3, index=step)
        return classification_loss(model, images, attributes)[0], {}

    trainer = Trainer("classifier", {"classifier": model}, model.parameters(), steps, run_dir, lr=3e-3, save_every=5)
    return model, trainer, loss_fn


def test_a_training_stage_lowers_its_loss(tmp_path):
    model, trainer, loss_fn = classifier_job(tmp_path, 40)
    first = loss_fn(0)[0].item()
    trainer.run(loss_fn, log_every=10, progress=False)
    last = json.loads(trainer.log_path.read_text().splitlines()[-1])["loss"]
    assert last < 0.7 * first


def test_an_interrupted_stage_resumes_where_it_stopped(tmp_path):
    straight, trainer, loss_fn = classifier_job(tmp_path / "straight", 10)
    trainer.run(loss_fn, progress=False)

    _, first_half, loss_fn = classifier_job(tmp_path / "resumed", 10)

    def interrupted(step):
        if step == 7:  # after the checkpoint at step 5
            raise KeyboardInterrupt
        return loss_fn(step)

    with pytest.raises(KeyboardInterrupt):
        first_half.run(interrupted, progress=False)
    resumed, second_half, loss_fn = classifier_job(tmp_path / "resumed", 10)
    calls = []
    second_half.run(lambda step: (calls.append(step), loss_fn(step))[1], progress=False)
    assert calls == list(range(5, 10))
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_contrastive_pairs_count_every_fitting_caption():
    _, _, attributes = shapes.batch(64, seed=0)
    fits = world.compatible(attributes)
    assert fits.diagonal().all()  # every caption fits its own image
    labels, mentioned = attributes.labels(), attributes.mentioned
    i, j = torch.nonzero(fits)[-1].tolist()
    assert all(labels[i, f] == labels[j, f] for f in range(5) if mentioned[j, f])


class FixedScorer:
    """Retrieves the caption an index table says, whatever the images."""

    def __init__(self, choice):
        self.choice = choice

    def retrieve(self, images, captions):
        return self.choice[:len(images)]


def test_scorer_retrieval_separates_own_fitting_and_untied():
    images, captions, attributes = shapes.batch(100, seed=1)
    fitting = world.compatible(attributes)
    perfect = world.scorer_retrieval(FixedScorer(torch.arange(100)), images, captions, attributes)
    assert perfect["scorer_top1_of_100"] == perfect["scorer_top1_fits_of_100"] == 1
    assert perfect["scorer_top1_of_100_untied"] == 1
    assert perfect["untied_share"] == pytest.approx((fitting.sum(1) == 1).float().mean().item())
    loose = fitting.sum(0).argmax()  # the caption that fits the most images, e.g. "a red circle"
    assert fitting[:, loose].sum() > 1
    always = world.scorer_retrieval(FixedScorer(torch.full((100,), loose)), images, captions, attributes)
    assert always["scorer_top1_of_100"] == pytest.approx(1 / 100)
    assert always["scorer_top1_fits_of_100"] == pytest.approx(fitting[:, loose].float().mean().item())
    ceilings = always["ceiling_top1_of_100_fitting_alike"], always["ceiling_top1_of_100_most_specific"]
    assert always["untied_share"] < ceilings[0] < ceilings[1] < 1  # ties cost even an oracle something
    assert ceilings == (perfect["ceiling_top1_of_100_fitting_alike"], perfect["ceiling_top1_of_100_most_specific"])


def test_most_specific_oracle_counts_ties_among_the_most_specific():
    # image 0 fits captions 0 ("a red circle", 2 named) and 1 (4 named); image 1 fits 1 and 2, both naming 4
    fitting = torch.tensor([[True, True, False], [False, True, True], [False, False, True]])
    mentioned = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 1]], dtype=torch.bool)
    assert world.most_specific_own_share(fitting, mentioned).tolist() == [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def shipped():
    if not (DEMO_DIR / "clean").exists():
        pytest.fail("the shipped demo model is missing: run `python train.py world`")
    from sau.evaluation.metrics import load_classifier
    import sau
    return sau.load("demo", dtype=torch.float32), load_classifier()


def test_the_shipped_model_draws_what_fixed_prompts_ask(shipped):
    sd, classifier = shipped
    prompts = ["a red circle", "a blue square", "a large green star in the center", "a yellow triangle on black",
               "an orange cross at the top left on a white background", "a purple circle, gray background",
               "a small blue star at the bottom right", "a red square at the top"]
    images = sd.generate(prompts, seeds=range(len(prompts)), steps=20)
    asked = shapes.parse_captions(prompts)
    accuracy = attribute_accuracy(classifier.predict(images), asked.labels())
    assert accuracy["shape"] >= 7 / 8 and accuracy["color"] >= 7 / 8, accuracy
    assert accuracy["position"] >= 3 / 4 and accuracy["background"] >= 2 / 3, accuracy  # 4 and 3 prompts ask


def test_the_shipped_manifest_lists_every_file_with_its_hash():
    manifest = json.loads((DEMO_DIR / "MANIFEST.json").read_text())
    for name, entry in manifest["files"].items():
        path = DEMO_DIR / name
        assert path.stat().st_size == entry["bytes"] and world.sha256(path) == entry["sha256"], name
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    # 40 MB was the budget; object-add raised it to 43 (README, Attacks): like BadT2I's three other demo
    # backdoors it needs its whole UNet trained, a 5.6 MB delta (as a LoRA of rank 8 it did not reach the bar)
    assert total < 43e6
