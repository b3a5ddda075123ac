"""The fast CrossMAE decoder (feature maps stacked on a leading dim, one fusion GEMM, every
block's K/V in one batched GEMM) against the straightforward per-block code it replaced,
written out here: stack on the last dim, Linear over k, slice, LayerNorm, per-block kv Linear."""
import pytest
import torch
import torch.nn.functional as F

from crossmae import create_model
from crossmae.decoders import CrossDecoder
from tests.conftest import smooth_images

# deliberately non-square: k maps != depth, encoder width != decoder width, T != Q
NUM_PATCHES, PATCH_DIM, ENC_DIM, NUM_MAPS, DEC_DIM, DEPTH, HEADS = 36, 12, 40, 5, 24, 3, 4
BATCH, TOKENS, QUERIES = 3, 10, 7


def reference_decoder(dec: CrossDecoder, encoder_out, ids_query: torch.Tensor) -> torch.Tensor:
    """The old per-block decoder, from the same parameters."""
    x = dec.queries(ids_query)
    if dec.fuse_features:
        stacked = torch.stack(encoder_out, dim=-1)  # (N, T, C, k)
        fused = F.linear(stacked, dec.feature_fusion.weight)  # (N, T, C, depth)
        contexts = [F.layer_norm(fused[..., i], (fused.shape[2],), norm.weight, norm.bias, norm.eps)
                    for i, norm in enumerate(dec.fused_norms)]
    else:
        contexts = [encoder_out] * len(dec.decoder_blocks)
    for blk, context in zip(dec.decoder_blocks, contexts):
        if blk.has_self_attn:
            x = x + blk.self_attn(blk.norm0(x))
        attn, (n, q_len, dim) = blk.cross_attn, x.shape
        h = attn.num_heads
        q = F.linear(blk.norm1(x), attn.q.weight, attn.q.bias).reshape(n, q_len, h, dim // h).transpose(1, 2)
        kv = F.linear(context, attn.kv.weight, attn.kv.bias)
        k, v = kv.reshape(n, -1, 2, h, dim // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, q_len, dim)
        x = x + F.linear(out, attn.proj.weight, attn.proj.bias)
        x = x + blk.mlp(blk.norm2(x))
    return dec.decoder_pred(dec.decoder_norm(x))


def small_decoder(fuse: bool, self_attn: bool) -> CrossDecoder:
    dec = CrossDecoder(NUM_PATCHES, PATCH_DIM, ENC_DIM, NUM_MAPS, DEC_DIM, DEPTH, HEADS,
                       fuse_features=fuse, self_attn=self_attn)
    dec.reset_parameters()
    with torch.no_grad():  # random everything, LayerNorm affines included, so no term vanishes
        for p in dec.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return dec


def encoder_features(fuse: bool):
    if fuse:
        return [torch.randn(BATCH, TOKENS, ENC_DIM, requires_grad=True) for _ in range(NUM_MAPS)]
    return torch.randn(BATCH, TOKENS, ENC_DIM, requires_grad=True)


def grads_of(dec, feats, out):
    inputs = list(feats) if isinstance(feats, list) else [feats]
    params = [p for p in dec.parameters() if p.requires_grad]
    weights = torch.randn_like(out)  # a loss whose gradient differs per output element
    return torch.autograd.grad((out * weights).sum(), params + inputs)


def run_both(dec, feats, ids):
    torch.manual_seed(1)
    fast = dec(feats, ids)
    fast_grads = grads_of(dec, feats, fast)
    torch.manual_seed(1)
    ref = reference_decoder(dec, feats, ids)
    ref_grads = grads_of(dec, feats, ref)
    return fast, ref, fast_grads, ref_grads


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("self_attn", [False, True])
@pytest.mark.parametrize("fuse", [True, False])
def test_fast_decoder_matches_per_block_reference(fuse, self_attn, checkpointing):
    dec = small_decoder(fuse, self_attn).train()
    dec.grad_checkpointing = checkpointing
    feats = encoder_features(fuse)
    ids = torch.stack([torch.randperm(NUM_PATCHES)[:QUERIES] for _ in range(BATCH)])
    fast, ref, fast_grads, ref_grads = run_both(dec, feats, ids)
    assert fast.shape == (BATCH, QUERIES, PATCH_DIM)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    names = [n for n, p in dec.named_parameters() if p.requires_grad]
    names += [f"map{i}" for i in range(len(fast_grads) - len(names))]
    assert len(fast_grads) == len(ref_grads) == len(names)
    for name, g_fast, g_ref in zip(names, fast_grads, ref_grads):
        assert g_ref.abs().sum() > 0, name  # every parameter takes part
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fuse", [True, False])
def test_recomputed_kv_matches_reference_and_saves_less(fuse):
    """recompute_kv: fusion, norms and K/V are recomputed in backward, not saved."""
    dec = small_decoder(fuse, False).train()
    feats = encoder_features(fuse)
    ids = torch.stack([torch.randperm(NUM_PATCHES)[:QUERIES] for _ in range(BATCH)])
    saved = {}
    for recompute in (False, True):
        dec.recompute_kv = recompute
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            dec(feats, ids)
        saved[recompute] = sum(sizes)
    fast, ref, fast_grads, ref_grads = run_both(dec, feats, ids)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-5)
    assert saved[True] < saved[False]


def test_fused_contexts_are_contiguous_per_block():
    dec = small_decoder(True, False)
    contexts = dec.contexts(encoder_features(True))
    assert len(contexts) == DEPTH and all(c.is_contiguous() for c in contexts)
    kv = dec.project_kv(contexts)
    assert kv.shape == (DEPTH, BATCH, TOKENS, 2 * DEC_DIM) and kv.is_contiguous()
    for blk, c, k in zip(dec.decoder_blocks, contexts, kv):
        torch.testing.assert_close(k, blk.cross_attn.kv(c), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fuse_use_input", [True, False])
def test_full_decoding_through_the_model_matches_reference(fuse_use_input):
    model = create_model("crossmae_vit_micro_patch4_dec64d2b", fuse_use_input=fuse_use_input).eval()
    imgs, noise = smooth_images(2), torch.rand(2, 64)
    out = model(imgs, noise, query="masked")
    feats = model.encoder(imgs, out.masking.ids_visible, return_all=True)
    feats = feats if fuse_use_input else feats[1:]
    with torch.no_grad():
        ref = reference_decoder(model.decoder, feats, out.masking.ids_masked)
    assert out.pred.shape == (2, 48, 48)
    torch.testing.assert_close(out.pred, ref, atol=1e-5, rtol=1e-5)


def test_compiles_without_graph_breaks(monkeypatch):
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)  # tests/conftest.py sets it: compile would be a no-op
    dec = small_decoder(True, False)
    feats = encoder_features(True)
    ids = torch.stack([torch.randperm(NUM_PATCHES)[:QUERIES] for _ in range(BATCH)])
    compiled = torch.compile(dec, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    out = compiled(feats, ids)
    torch.testing.assert_close(out, reference_decoder(dec, feats, ids), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert dec.feature_fusion.weight.grad is not None


def test_state_dict_keys_and_shapes_are_unchanged():
    """Checkpoint interop (crossmae/interop.py maps the released names onto these)."""
    dec = CrossDecoder(NUM_PATCHES, PATCH_DIM, ENC_DIM, NUM_MAPS, DEC_DIM, depth=2, num_heads=HEADS, self_attn=True)
    shapes = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    expected = {"mask_token": (1, 1, 24), "decoder_pos_embed": (1, 37, 24), "feature_fusion.weight": (2, 5),
                "decoder_norm.weight": (24,), "decoder_norm.bias": (24,),
                "decoder_pred.weight": (12, 24), "decoder_pred.bias": (12,)}
    for i in range(2):
        expected.update({f"fused_norms.{i}.weight": (40,), f"fused_norms.{i}.bias": (40,)})
        b = f"decoder_blocks.{i}."
        expected.update({
            b + "norm0.weight": (24,), b + "norm0.bias": (24,),
            b + "self_attn.qkv.weight": (72, 24), b + "self_attn.qkv.bias": (72,),
            b + "self_attn.proj.weight": (24, 24), b + "self_attn.proj.bias": (24,),
            b + "norm1.weight": (24,), b + "norm1.bias": (24,),
            b + "cross_attn.q.weight": (24, 24), b + "cross_attn.q.bias": (24,),
            b + "cross_attn.kv.weight": (48, 40), b + "cross_attn.kv.bias": (48,),
            b + "cross_attn.proj.weight": (24, 24), b + "cross_attn.proj.bias": (24,),
            b + "norm2.weight": (24,), b + "norm2.bias": (24,),
            b + "mlp.fc1.weight": (96, 24), b + "mlp.fc1.bias": (96,),
            b + "mlp.fc2.weight": (24, 96), b + "mlp.fc2.bias": (24,),
        })
    assert shapes == expected
