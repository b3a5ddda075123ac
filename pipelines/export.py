"""`crossmae-export`: declared now so the command exists; the tool itself arrives with issue #6 (batch export of checkpoints)."""
import sys


def main() -> int:
    print("crossmae-export: not implemented yet; it arrives with issue #6 (batch export of checkpoints)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
