"""``crossmae-eval finetune``: end-to-end fine-tuning of an exported encoder, MAE's protocol,
under DeepSpeed like pretraining.

    deepspeed --num_gpus 8 -m pipelines.finetune s3://b/exports/step00100000 --config ft.yaml
    torchrun --nproc_per_node 2 -m pipelines.finetune ./export data.train=./wds/train/manifest.json \\
        data.val=./wds/val/manifest.json optim.epochs=5 deepspeed.micro_batch=32
    crossmae-eval finetune ./export --config ft.yaml          (one plain process)

The recipe, what is written and what is checked: pipelines/eval/finetune.py.
"""
from __future__ import annotations

import sys

from pipelines.eval.finetune import main

if __name__ == "__main__":
    sys.exit(main())
