#!/usr/bin/env python3
"""Greedy decode tokens/s of PyTorch eager (Hugging Face transformers) on a checkpoint: the peer
that `moert bench --model DIR --backend cuda` is compared with (scripts/gpu/check.sh runs both
on the same checkpoint, e.g. ../shared/peers/make_bench_checkpoint.py's).

    torch_decode.py CHECKPOINT_DIR [--device cuda] [--dtype bfloat16|float32] [--tg 64]
                    [--batches 1,16] [--prompt 16] [--reps 3] [--attn sdpa|eager] [--json OUT]

The model is built by transformers from the checkpoint's config.json and weights, run without
torch.compile (eager). A figure is moert bench's: `tg` new tokens per sequence after a
`prompt`-token random prompt, for `batch` sequences, timed once every sequence has its first
token: batch * tg / (t(tg + 1 new tokens) - t(1 new token)), greedy, EOS ignored. Each figure
is the median of `reps` runs (min and max printed beside it) after one warm-up."""
import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tg", type=int, default=64, help="decode tokens timed per sequence")
    ap.add_argument("--batches", default="1,16", help="sequences per figure, comma-separated")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens before the decode")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention kernel")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", help="also write the figures as JSON")
    return ap.parse_args()


def load(a):
    dtype = getattr(torch, a.dtype)
    try:  # transformers >= 4.56 names it dtype; older ones torch_dtype
        model = AutoModelForCausalLM.from_pretrained(a.checkpoint, dtype=dtype, attn_implementation=a.attn)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(a.checkpoint, torch_dtype=dtype, attn_implementation=a.attn)
    model.to(a.device).eval()
    cfg = model.generation_config
    cfg.eos_token_id = None  # every sequence decodes all its tokens, as moert bench's do
    cfg.pad_token_id = 0
    cfg.do_sample = False
    return model


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def seconds(model, prompts, new_tokens, device):
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         use_cache=True)
    sync(device)
    assert out.shape[1] == prompts.shape[1] + new_tokens, out.shape
    return time.perf_counter() - t0


def main():
    a = parse()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("torch_decode: --device %s but torch sees no CUDA device" % a.device)
    model = load(a)
    vocab = model.config.vocab_size
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(a.seed)
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
    print("# torch_decode: %s, %s, %.1fM parameters, %s, attention %s; torch %s, transformers %s, %s"
          % (a.checkpoint, model.config.model_type, params / 1e6, a.dtype, a.attn, torch.__version__,
             transformers.__version__, device_name))
    print("# figure: %d new tokens per sequence after a %d-token prompt; tokens/s once every sequence has its "
          "first token; median (min-max) of %d runs after a warm-up" % (a.tg, a.prompt, a.reps))
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        prompts = torch.randint(0, vocab, (batch, a.prompt), generator=gen).to(a.device)
        seconds(model, prompts, 2, a.device)  # warm-up: kernels, allocator, caches
        rates = []
        for _ in range(a.reps):
            first = seconds(model, prompts, 1, a.device)
            full = seconds(model, prompts, a.tg + 1, a.device)
            rates.append(batch * a.tg / max(full - first, 1e-9))
        med = statistics.median(rates)
        print("| decode, %2d sequence%s | %10.1f (%.1f-%.1f) tokens/s |"
              % (batch, "" if batch == 1 else "s", med, min(rates), max(rates)))
        rows.append({"engine": "pytorch eager (transformers)", "figure": "decode, %d sequences" % batch,
                     "batch": batch, "tokens_per_s": med, "min": min(rates), "max": max(rates), "dtype": a.dtype,
                     "attention": a.attn, "torch": torch.__version__, "transformers": transformers.__version__,
                     "device": device_name})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
