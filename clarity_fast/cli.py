"""The ``clarity-fast`` command line."""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

def _demo(args: argparse.Namespace) -> None:
    """Build a CLARiTy model, run one forward and backward on a random image, print the maps."""

    from . import ClarityLoss, create_model
    from .flops import count_macs

    model = create_model(args.model, pretrained=args.pretrained)
    side = model.patch_embed.img_size[0]
    n_params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, tuple(model.patch_embed.img_size))
    print(f"{args.model}: {n_params / 1e6:.2f} M parameters, {macs['total'] / 1e9:.2f} G MACs per image, "
          f"{model.num_classes} class tokens, grid {tuple(model.grid_size)}")
    x = torch.randn(args.batch_size, model.in_chans, side, side)
    t0 = time.perf_counter()
    out = model.forward_outputs(x)
    loss = ClarityLoss()(out, torch.randint(0, 2, out.logits.shape).float())
    loss.total.backward()
    print(f"forward + backward on {args.batch_size} random image(s): {time.perf_counter() - t0:.2f} s")
    for name in ("logits", "maps", "heatmap", "scores", "loc_map", "class_states"):
        t = getattr(out, name)
        print(f"  {name:13s} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
    print("  loss terms:   " + ", ".join(f"{k}={v.item():.4f}" for k, v in loss.terms.items()))
    rows = out.maps.flatten(2).sum(-1)
    print(f"  class-to-patch map row sums in [{rows.min().item():.3f}, {rows.max().item():.3f}] (<= 1)")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clarity-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a CLARiTy model and run it once on a random image")
    demo.add_argument("--model", default="clarity_s16_224", help="registered model name (default: %(default)s)")
    demo.add_argument("--pretrained", default=None, help="local DINO / timm / CLARiTy checkpoint file")
    demo.add_argument("--batch-size", type=int, default=1)
    demo.set_defaults(func=_demo)
    return parser

def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"clarity-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
