"""Who owns a run folder: the two things that keep runs out of each other's folders.

- the claim (claim_run_dir): run.json records the settings and the inputs' fingerprints of the run that made a
  folder; a run with other ones is refused, naming the first setting that differs, instead of resuming (or
  reporting on) someone else's checkpoints; a folder that holds no claim and is not empty is someone else's
  (refuse_foreign_folder) unless --force empties it (clear_folder);
- the lock (hold_lock): FOLDER/.lock, held by one process for its whole run, so that two runs never write one
  folder at once; a lock left by a process that died is reported and taken over.
"""
import contextlib
import datetime
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from sau import distributed
from sau.common.files import save_json

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to an exclusive create
    fcntl = None


# --- who made a run folder: the claim ----------------------------------------------------------------------------

CLAIM_NAME = "run.json"
CHOOSE_ANOTHER = "choose another folder or delete it"  # what a refusal suggests, unless the command says better


def claim_run_dir(run_dir, spec, hint=CHOOSE_ANOTHER):
    """Resuming is only safe in a run folder made by the same run: record the spec (the settings and the inputs'
    fingerprints) in run_dir/run.json the first time, and refuse a folder whose run.json records another."""
    refuse_other_run(run_dir, spec, hint)
    save_json(spec, Path(run_dir) / CLAIM_NAME)  # under torchrun, rank 0's (sau.common.files.atomic_write)


def refuse_other_run(run_dir, spec, hint=CHOOSE_ANOTHER):
    """A ValueError naming the first setting in which run_dir's claim differs from spec; nothing if it has none."""
    path = Path(run_dir) / CLAIM_NAME
    if not path.is_file():
        return
    try:
        theirs = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{run_dir} holds an unreadable {CLAIM_NAME}; {hint}") from None
    difference = first_difference(json.loads(json.dumps(spec)), theirs)  # through JSON: tuples read back as lists
    if difference:
        key, here, there = difference
        raise ValueError(f"{run_dir} holds a different run ({key} differs: {here} here, {there} there); {hint}")


ABSENT = object()  # a key one side lacks


def first_difference(mine, theirs, key=""):
    """(key, my value, their value) as text where two claims first differ, or None. Records, and lists of one
    length, are compared entry by entry, so that the key can name `recipe.lr` or `prompts.3`."""
    if mine == theirs:
        return None
    entries = _entries(mine, theirs)
    if entries is None:
        return key or "the claim", shown(mine, key), shown(theirs, key)
    a, b = entries
    for k in [*a, *(k for k in b if k not in a)]:
        found = first_difference(a.get(k, ABSENT), b.get(k, ABSENT), f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def _entries(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        return a, b
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return dict(enumerate(a)), dict(enumerate(b))
    return None


def shown(value, key=""):
    """A value short enough for a one-line message: hashes cut to 8 digits, long text to its ends, long lists and
    records to their size (cut JSON would leave its quotes unbalanced), invisible characters escaped."""
    if value is ABSENT:
        return "absent"
    if isinstance(value, str):
        text = value.encode("unicode_escape").decode()  # invisible triggers and newlines, written out
        if key.endswith("sha256") and len(text) == 64:
            return text[:8] + ".."
        return text if len(text) <= 48 else text[:20] + ".." + text[-20:]
    text = json.dumps(value, ensure_ascii=False)
    if len(text) <= 48 or not isinstance(value, (dict, list)):
        return text
    return f"{len(value)} {'entries' if isinstance(value, dict) else 'items'}"


def text_sha256(lines):
    """The hash a claim records for a list of prompts: sha256 of the lines joined by newlines."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def refuse_foreign_folder(folder, spec, force, hint, flag="--out"):
    """An output folder that a command fills entirely (unlearn's --out) must be empty, or hold a claim of the
    same run (a rerun resumes it); anything else is someone else's and is refused, unless force."""
    folder = Path(folder)
    if force:
        return _refuse_to_empty(folder, flag)
    if not folder.is_dir():
        return
    if (folder / CLAIM_NAME).is_file():
        return refuse_other_run(folder, spec, hint)
    if any(p.name != LOCK_NAME for p in folder.iterdir()):
        raise ValueError(f"{folder} exists and was not made by this command; pass --force to replace it, "
                         f"or another {flag}")


def _refuse_to_empty(folder, flag):
    """--force empties the folder: never the one the user stands in, a folder above it, or their home."""
    here = Path.cwd().resolve()
    if folder.resolve() in (here, *here.parents, Path.home().resolve()):
        raise ValueError(f"--force would empty {flag} {folder}, the current folder, one above it or your home; "
                         "give a folder of its own")


def clear_folder(folder):
    """--force: empty the folder, all but its lock, so a run starts from scratch. Links inside are removed, never
    followed: what they point to (an input model, say) stays. Under torchrun, rank 0 empties it."""
    if not distributed.is_main():
        return
    for entry in Path(folder).iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# --- one process per folder: the lock ----------------------------------------------------------------------------

LOCK_NAME = ".lock"


@contextlib.contextmanager
def hold_lock(folder, flag="--out"):
    """Hold FOLDER/.lock for the block: made (with the folder) if missing, holding this process's pid, host and
    start time, removed on exit. Another process holding it: a ValueError at once. One that died holding it
    (its lock file is left, its pid no longer runs): a note on stderr, and the lock is taken over.

    With fcntl the lock is an flock on the file, which the kernel drops when its holder dies, however it dies;
    the record in the file is for the messages (and the pid check, where flock is not enforced). Folders made
    here and left empty (a refusal after the lock) are removed again.

    Under torchrun rank 0 holds the lock for the whole launch; a second launch's rank 0 is refused, and
    torchrun stops that launch's other ranks with it."""
    if not distributed.is_main():
        yield None
        return
    folder, path = Path(folder), Path(folder) / LOCK_NAME
    made = _make_folder(folder, flag)
    try:
        fd = _take_flock(path, folder, flag) if fcntl else _take_exclusive(path, folder, flag)
        try:
            yield path
        finally:
            _release(fd, path)
    finally:
        for made_folder in made:  # deepest first; stops at the first that holds something
            with contextlib.suppress(OSError):
                made_folder.rmdir()


def _make_folder(folder, flag):
    """mkdir -p, returning the folders it made (deepest first); a file in the way is bad input, not a traceback."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    blocking = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        where = "is a file" if blocking == folder else f"lies under {blocking}, a file"
        raise ValueError(f"{flag} {folder} {where}; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot make {flag} {folder}: {e.strerror}") from None
    return [p for p in missing if p.is_dir()]


def _take_flock(path, folder, flag):
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ValueError(f"cannot write the lock {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ValueError(in_use(folder, _read_record(path), flag)) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed the file between our open and our flock: lock the one there now
    previous = _parse_record(_read_fd(fd))
    if previous and _holder_running(previous):  # a live holder without the flock: flock is not enforced here
        os.close(fd)
        raise ValueError(in_use(folder, previous, flag))
    if previous:
        _note_stale(folder, previous)
    _write_record(fd)
    return fd


def _take_exclusive(path, folder, flag):
    """Without fcntl: create the file exclusively; a leftover whose pid no longer runs is removed once."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            previous = _read_record(path)
            if previous is None or _holder_running(previous):
                raise ValueError(in_use(folder, previous, flag)) from None
            _note_stale(folder, previous)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        _write_record(fd)
        return fd
    raise ValueError(in_use(folder, _read_record(path), flag))


def _note_stale(folder, previous):
    """One line on stderr: the lock left by a run that died is taken over."""
    if "pid" not in previous:
        return  # an empty record: its holder died before writing it
    why = f"on host {previous.get('host')}" if previous.get("host") != socket.gethostname() else "not running"
    print(f"note: {folder} had a stale lock from pid {previous['pid']} ({why}); taking it over", file=sys.stderr)


def _write_record(fd):
    """This process as the lock's holder, for the messages of those refused."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "process_started": _process_started(os.getpid()), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())


def _release(fd, path):
    """Remove the lock file, then let go. With flock the file goes first, while still held: a process that
    opened it meanwhile finds, once it has the flock, that the file is no longer there, and starts over."""
    if fcntl:
        if _same_file(fd, path):
            os.remove(path)
        os.close(fd)
    else:
        os.close(fd)  # Windows cannot remove an open file
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def in_use(folder, record, flag):
    """The refusal's one line: who holds the folder, since when."""
    if not record or "pid" not in record:
        who = "just starting"
    else:
        host = "" if record.get("host") == socket.gethostname() else f" on {record.get('host')}"
        who = f"pid {record['pid']}{host} since {_clock(record.get('started'))}"
    return f"{folder} is in use by another sau run ({who}); wait for it or choose another {flag}"


def _clock(started):
    if not isinstance(started, (int, float)):
        return "an unknown time"
    when = datetime.datetime.fromtimestamp(started)
    return when.strftime("%H:%M:%S" if when.date() == datetime.date.today() else "%Y-%m-%d %H:%M:%S")


def _holder_running(record):
    """Whether the process a lock file records still runs: same host, its pid alive, and (where /proc tells) the
    same process, not a later one given the same pid."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False  # another host's pid means nothing here; our own pid is not "another" run
    return _pid_alive(pid) and record.get("process_started") in (None, _process_started(pid))


def _pid_alive(pid):
    if os.name == "nt":  # os.kill(pid, 0) would end the process there; assume alive: delete a stale .lock by hand
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _process_started(pid):
    """The process's start, in clock ticks since boot (Linux /proc), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _same_file(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_fd(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_record(path):
    try:
        return _parse_record(Path(path).read_bytes())
    except OSError:
        return None


def _parse_record(data):
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None
