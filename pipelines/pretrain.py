"""`crossmae-pretrain`: declared now so the command exists; the tool itself arrives with issue #5 (DeepSpeed pretraining)."""
import sys


def main() -> int:
    print("crossmae-pretrain: not implemented yet; it arrives with issue #5 (DeepSpeed pretraining)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
