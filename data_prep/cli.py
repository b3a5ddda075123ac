"""`crossmae-prep`: declared now so the command exists; the tool itself arrives with issue #3 (data prep: ImageNet -> WebDataset/FFCV shards)."""
import sys


def main() -> int:
    print("crossmae-prep: not implemented yet; it arrives with issue #3 (data prep: ImageNet -> WebDataset/FFCV shards)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
