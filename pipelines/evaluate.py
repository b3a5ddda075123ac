"""`crossmae-eval`: declared now so the command exists; the tool itself arrives with issue #6 (k-NN, linear probe, fine-tune)."""
import sys


def main() -> int:
    print("crossmae-eval: not implemented yet; it arrives with issue #6 (k-NN, linear probe, fine-tune)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
