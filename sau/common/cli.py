"""What the four command-line tools share: one clear line and exit status 2 for bad input, never a traceback."""
import sys

from sau.weights.bundle import CheckpointError
from sau.common.training import NonFiniteLoss

USER_ERRORS = (CheckpointError, NonFiniteLoss, ValueError, FileNotFoundError, FileExistsError, KeyError)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(main):
    """Run main(); user errors print one line and exit 2, Ctrl-C exits 130 (checkpoints are already on disk)."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        fail(str(e).strip("'\"").splitlines()[0] if str(e) else type(e).__name__)
