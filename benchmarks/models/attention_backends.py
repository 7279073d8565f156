"""Which PyTorch attention kernel should the dense causal path use on this GPU? Times the flash and
cuDNN forwards and backwards (bf16, grouped K/V) at the three models' shapes, and checks that they
agree (outputs, logsumexp and gradients against an fp32 reference).

    python benchmarks/models/attention_backends.py --out attention_backends.json
"""

from __future__ import annotations

import argparse
import json

import torch

from collider_kernels.timing import median_ms

aten = torch.ops.aten
SHAPES = {"tinyllama-1.1b": (32, 4, 64), "qwen2.5-1.5b": (12, 2, 128), "phi-1.5": (32, 32, 64)}


def flash(q, k, v, do, scale):
    out, lse, cq, ck, mq, mk, seed, off, _ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False,
                                                                                      scale=scale)
    grads = aten._scaled_dot_product_flash_attention_backward(do, q, k, v, out, lse, cq, ck, mq, mk, 0.0, True, seed,
                                                              off, scale=scale)
    return out, lse, grads


def cudnn(q, k, v, do, scale):
    out, lse, cq, ck, mq, mk, seed, off, _ = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True,
                                                                                      False, scale=scale)
    grads = aten._scaled_dot_product_cudnn_attention_backward(do, q, k, v, out, lse, seed, off, None, cq, ck, mq, mk,
                                                              0.0, True, scale=scale)
    return out, lse, grads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for model, (hq, hkv, d) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        B, T = args.batch, args.seq

        def rnd(h):
            return torch.randn(B, h, T, d, device="cuda", dtype=torch.bfloat16, generator=g)

        q, k, v, do = rnd(hq), rnd(hkv), rnd(hkv), rnd(hq)
        scale = d**-0.5
        ref_q, ref_k, ref_v = (t.float().requires_grad_() for t in (q, k, v))
        group = hq // hkv
        ref = torch.nn.functional.scaled_dot_product_attention(
            ref_q, ref_k.repeat_interleave(group, 1), ref_v.repeat_interleave(group, 1), is_causal=True, scale=scale)
        ref.backward(do.float())
        row = {"model": model, "heads": hq, "kv_heads": hkv, "head_dim": d}
        for name, fn in (("flash", flash), ("cudnn", cudnn)):
            try:
                out, lse, (dq, dk, dv) = fn(q, k, v, do, scale)
            except RuntimeError as exc:
                row[name] = {"error": str(exc)[:200]}
                continue
            torch.cuda.synchronize()

            def rel(a, b):
                return float((a.float() - b).norm() / b.norm())

            row[name] = {
                "lse_shape": list(lse.shape), "lse_dtype": str(lse.dtype),
                "rel_err": {"out": rel(out, ref.detach()), "dq": rel(dq, ref_q.grad), "dk": rel(dk, ref_k.grad),
                            "dv": rel(dv, ref_v.grad)},
                "ms": median_ms(lambda fn=fn: fn(q, k, v, do, scale), repeats=7),
            }
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
