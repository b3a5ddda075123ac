"""Stage 5: checkpoints: the checkpointer (save / resume / store mirror), the store side, integrity manifests,
resume selection, run-directory checks, resharding and the export job (checkpoint -> timm encoder)."""
