"""``bame flops``: predict a run's training FLOPs without data or training.

Builds the model and the sparsifier exactly as ``bame train`` would, then counts every iteration of the
schedule through the same ledger the run uses, so the prediction equals the ``summary.json`` of the run.
Both charging rules are shown (see docs/flops.md), per phase and per product, against dense training and
against SR-STE at the same N:M.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from bame.cli.options import add_config_flags, add_method_flags, resolve
from bame.config import TrainConfig

_PRODUCTS = (("fwd", "fwd"), ("dX", "dx"), ("dW", "dw"), ("other", "other"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="predict a run's training FLOPs (both rules) without training",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--config", help="a YAML recipe (see recipes/); flags given here override it")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.add_argument("--steps-per-epoch", type=int,
                   help="iterations per epoch (default: floor(train size / batch))")
    p.add_argument("--compare", default="sr_ste",
                   help="method to compare with at the same N:M ('none': skip)")
    add_config_flags(p)
    add_method_flags(p)
    p.set_defaults(run=run)


def reference_config(cfg: TrainConfig, method: str) -> TrainConfig:
    """``cfg`` with another method, keeping only the options that method has."""
    from bame import methods

    fields = {f.name for f in dataclasses.fields(methods.get(method).Options)}
    options = {k: v for k, v in cfg.method_options.items() if k in fields}
    return dataclasses.replace(cfg, method=method, method_options=options)


def predict_with_reference(cfg: TrainConfig, compare: str, spe: int | None) -> dict[str, Any]:
    """The prediction for ``cfg``, plus its ratios to the ``compare`` method's prediction."""
    from bame.predict import predict

    out = predict(cfg, spe)
    if compare != "none":
        ref = out if compare == cfg.method else predict(reference_config(cfg, compare), spe)
        out["compare"] = compare
        out["compare_train_flops_ratio"] = ref["train_flops_ratio"]
        out["compare_train_flops_ratio_hw"] = ref["train_flops_ratio_hw"]
        out["ratio_to_compare"] = out["train_flops"] / ref["train_flops"]
        out["ratio_to_compare_hw"] = out["train_flops_hw"] / ref["train_flops_hw"]
    return out


def phase_lines(pred: dict[str, Any]) -> list[str]:
    """Per phase: steps and each product's FLOPs as a share of dense training (rows sum to the ratio)."""
    dense = pred["dense_train_flops"]
    head = f"{'phase':12s} {'steps':>8s}" + "".join(f" {name:>7s}" for name, _ in _PRODUCTS)
    lines = [head + f" {'total':>7s} {'(hw)':>7s}"]
    total = {**pred["flops_by_product"], "steps": pred["steps"]}
    rows = [*pred["flops_by_phase"].items(), ("all", total)]
    for phase, b in rows:
        paper = sum(b.get(k, 0.0) for k in ("fwd", "dx", "dw", "other"))
        hw = sum(b.get(k, 0.0) for k in ("fwd_hw", "dx_hw", "dw_hw", "other"))
        cells = "".join(f" {b.get(key, 0.0) / dense:7.3f}" for _, key in _PRODUCTS)
        lines.append(f"{phase:12s} {int(b['steps']):8d}{cells} {paper / dense:7.3f} {hw / dense:7.3f}")
    return lines


def format_prediction(pred: dict[str, Any]) -> list[str]:
    """The human-readable report of :func:`predict_with_reference`."""
    nm = pred["nm"] if pred["uses_masks"] else "dense"
    r = pred["product_ratio"]
    lines = [
        f"{pred['model']} on {pred['dataset']}, {pred['method']} {nm}: {pred['epochs']} epochs x "
        f"{pred['steps_per_epoch']} steps (batch {pred['batch_size']}) -> {pred['steps']} steps "
        f"(dense baseline: {pred['nominal_steps']})",
        f"weight layers: {pred['sparse_layers']} sparse, {pred['dense_layers']} dense; "
        f"dense training = {pred['dense_train_flops']:.3g} FLOPs",
        "",
        "FLOPs per phase and product, as a share of dense training (rule 'paper'; (hw): 'nm-hardware'):",
        *phase_lines(pred),
        "",
        f"each product vs. dense:  paper fwd {r['fwd']:.3f}  dX {r['dx']:.3f}  dW {r['dw']:.3f}   "
        f"nm-hardware fwd {r['fwd_hw']:.3f}  dX {r['dx_hw']:.3f}  dW {r['dw_hw']:.3f}",
        "",
    ]
    for rule, suffix in (("paper", ""), ("nm-hardware", "_hw")):
        text = f"training FLOPs, rule {rule + ':':13s} {pred['train_flops' + suffix]:.3g}  " \
               f"{pred['train_flops_ratio' + suffix]:.3f}x dense"
        if "compare" in pred:
            text += f"  {pred['ratio_to_compare' + suffix]:.3f}x {pred['compare']} " \
                    f"({pred['compare']}: {pred['compare_train_flops_ratio' + suffix]:.3f}x dense)"
        lines.append(text)
    lines.append(f"inference FLOPs: {pred['test_flops_ratio']:.3f}x dense")
    return lines


def run(args: argparse.Namespace) -> int:
    from bame.cli.options import check_positive

    cfg = resolve(args)
    if args.steps_per_epoch is not None:
        check_positive(args.steps_per_epoch, "--steps-per-epoch")
    pred = predict_with_reference(cfg, args.compare, args.steps_per_epoch)
    print(json.dumps(pred, indent=2) if args.json else "\n".join(format_prediction(pred)))
    return 0
