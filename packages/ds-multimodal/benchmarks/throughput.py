"""Training throughput (items/s) of the aligner: AlignTask's loss + backward + AdamW step, per batch size
and precision, on CPU or a GPU.

An item is one (caption, image, 4-frame video, 1 s audio clip) tuple. The data is the built-in train split;
on a machine without scikit-learn / espeak-ng (the lent GPU machine) save it here first and pass the file:

    python packages/ds-multimodal/benchmarks/throughput.py --save-data runs/mm-data/train.safetensors
    python packages/ds-multimodal/benchmarks/throughput.py --data runs/mm-data/train.safetensors --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ds_multimodal.encoders import EncoderConfig, tokenize
from ds_multimodal.losses import cross_modal_loss
from ds_multimodal.model import AlignerConfig, MultimodalAligner


def save_data(path: Path, limit: int = 0) -> None:
    from ds_multimodal.data import load_digits_multimodal

    d = load_digits_multimodal("train", limit=limit)
    ids, mask = tokenize(d.captions, EncoderConfig().max_text_len)
    tensors = {"images": d.images, "videos": d.videos, "labels": d.labels, "text_ids": ids, "text_mask": mask}
    if d.audio is not None:
        tensors["audio"] = d.audio.half()  # half the file (the GPU machine gets it through a 64 MiB carry)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    print(f"saved {len(d)} items ({', '.join(tensors)}) to {path}")


def measure(
    data: dict, device: torch.device, encoder: EncoderConfig, batch: int, dtype: str, steps: int
) -> dict:
    torch.manual_seed(0)
    model = MultimodalAligner(AlignerConfig(encoder=encoder, audio="audio" in data)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    n = data["labels"].shape[0]
    g = torch.Generator().manual_seed(0)

    def step() -> float:
        idx = torch.randint(n, (batch,), generator=g).to(device)
        b = {k: data[k][idx] for k in ("text_ids", "text_mask", "labels")}
        b.update(
            {
                m: data[k][idx]
                for m, k in (("image", "images"), ("video", "videos"), ("audio", "audio"))
                if k in data
            }
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            emb, scale = model(b)
            loss = cross_modal_loss(
                {m: e.float() for m, e in emb.items()}, logit_scale=scale, labels=b["labels"]
            ).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(3):  # warm-up: allocator, kernels, autotuning
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()  # float() syncs every step, as a training loop that logs the loss does
    seconds = time.perf_counter() - t0
    out = {
        "batch": batch,
        "dtype": dtype,
        "steps": steps,
        "seconds": seconds,
        "items_per_s": batch * steps / seconds,
    }
    out["final_loss"] = loss
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--save-data", type=Path, help="write the train split here and exit")
    ap.add_argument("--save-limit", type=int, default=512, help="items --save-data keeps (0 = all 1258)")
    ap.add_argument("--data", type=Path, help="a file written by --save-data (default: load the split here)")
    ap.add_argument("--out", type=Path, help="directory for throughput.json")
    ap.add_argument("--batches", default="64,256,1024", help="comma-separated batch sizes")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    ap.add_argument("--wide", action="store_true", help="also a wider encoder (hidden 256, 4 layers)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    args = ap.parse_args()
    if args.save_data:
        save_data(args.save_data, args.save_limit)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.data:
        data = load_file(str(args.data))
    if "audio" in data:
        data["audio"] = data["audio"].float()
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            save_data(Path(tmp) / "train.safetensors")
            data = load_file(str(Path(tmp) / "train.safetensors"))
    data = {k: v.to(device) for k, v in data.items()}
    encoders = {"default (hidden 64, 2 layers)": EncoderConfig()}
    if args.wide:
        encoders["wide (hidden 256, 4 layers)"] = EncoderConfig(
            embed_dim=256, hidden_dim=256, n_layers=4, n_heads=8
        )
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    record = {
        "device": name,
        "torch": torch.__version__,
        "audio": "audio" in data,
        "load_average": os.getloadavg(),
        "runs": [],
    }
    for label, enc in encoders.items():
        for dtype in args.dtypes.split(","):
            for batch in map(int, args.batches.split(",")):
                r = {"encoder": label, **measure(data, device, enc, batch, dtype, args.steps)}
                record["runs"].append(r)
                print(json.dumps(r), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
