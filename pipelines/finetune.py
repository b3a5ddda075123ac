"""``crossmae-eval finetune``: end-to-end fine-tuning of an exported encoder, MAE's protocol,
under DeepSpeed like pretraining.

    deepspeed --num_gpus 8 -m pipelines.finetune s3://b/exports/step00100000 --config ft.yaml
    torchrun --nproc_per_node 2 -m pipelines.finetune ./export data.train=./wds/train/manifest.json \\
        data.val=./wds/val/manifest.json optim.epochs=5 deepspeed.micro_batch=32
    crossmae-eval finetune ./export --config ft.yaml          (one plain process)

The export (a directory or storage prefix: model.safetensors, timm config.json, export.json)
becomes a timm ViT with a fresh head (global average pooling + fc_norm, drop path), trained
with layer-wise lr decay (timm's BEiT/MAE param groups), warmup + cosine, AdamW, RandAugment,
random erasing, mixup/cutmix and label smoothing; top-1/top-5 on the val manifest after every
epoch, each val sample counted exactly once across ranks (every collective through
pipelines.runtime.distributed, whose tensors are on the device the backend needs: CUDA under NCCL). Writes ``run.output``/metrics.jsonl,
config.yaml, deepspeed.json, checkpoints/epoch####/ (``--resume auto``), and the result
``<export>/eval/finetune.json``. The export's files are checked against the sha256 its
export.json records before use (pipelines/eval/inputs.py; the result records the sha256 of the
bytes read), its weights must be finite, and every config value is checked (pipelines/eval/finetune_config.py).
"""
from __future__ import annotations

import sys

from pipelines.eval.finetune import main

if __name__ == "__main__":
    sys.exit(main())
