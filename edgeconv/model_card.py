"""MODEL_CARD.md + model_card.json: one file a reviewer reads to decide whether the model ships."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from edgeconv_runtime.fileio import atomic_write_json, atomic_write_text

from .augment import PRESETS
from .data import shown

CARD_JSON, CARD_MD = "model_card.json", "MODEL_CARD.md"


def build_card(dataset, metrics: dict, config: dict, history: list) -> dict:
    best = next((h for h in history if h["epoch"] == metrics["best_epoch"]), history[-1] if history else {})
    d = dataset.describe()
    preset = config.get("augment_preset")
    return {
        "model": metrics["model"],
        "strategy": metrics.get("strategy"),
        "parameters": metrics["parameters"],
        # paths as printable text (a non-UTF-8 folder name shows as \xNN): the card is a document, not a locator
        "data": {"source": shown(d["source"]), "test_source": d["test_source"] and shown(d["test_source"]), "fingerprint": d["fingerprint"], "classes": d["classes"],
                 "class_counts": d["class_counts"], "val_carved_from_train": d["val_carved_from_train"], "skipped_images": d["skipped_images"]},
        "training": {k: config.get(k) for k in ("seed", "epochs", "optimizer", "lr", "lr_schedule", "batch_size", "weight_decay", "dropout",
                                                 "label_smoothing", "unfreeze", "head_epochs", "head_augment", "fine_tune_lr", "ema",
                                                 "bf16", "channels_last")}
        | {"epochs_run": metrics["epochs_run"], "best_epoch": metrics["best_epoch"], "stopped_early": metrics["stopped_early"],
           "train_seconds": metrics["train_seconds"], "world_size": metrics.get("world_size", 1),
           "augmentation": {"preset": preset, **PRESETS[preset]} if preset else None},
        "accuracy": {"train": best.get("train_acc"), "val": metrics["val_accuracy"], "test": metrics["test_accuracy"]},
        "curves": "curves.png",
        "export": None,
        "benchmarks": None,
    }


def render(card: dict) -> str:
    acc = card["accuracy"]
    fmt = lambda v: f"{100 * v:.2f} %" if isinstance(v, (int, float)) else "n/a"  # noqa: E731
    t, d = card["training"], card["data"]
    lines = [
        f"# Model card: {card['model']} ({card.get('strategy') or 'scratch'})",
        "",
        "## Accuracy",
        "",
        "| split | accuracy | images |",
        "|---|---|---|",
    ]
    for split in ("train", "val", "test"):
        n = sum((d["class_counts"].get(split) or {}).values()) if d["class_counts"].get(split) else 0
        lines.append(f"| {split} | {fmt(acc.get(split))} | {n} |")
    lines += ["", "![training curves](curves.png)" if card.get("curves") else "", "", "## Data", "",
              f"- source: `{d['source']}`" + (f", test from `{d['test_source']}`" if d.get("test_source") else ""),
              f"- fingerprint (sha256 of every file read): `{d['fingerprint']}`",
              f"- classes: {', '.join(d['classes'])}",
              f"- validation split carved from train: {d['val_carved_from_train']}; unreadable images skipped: {d['skipped_images']}",
              "", "| split | " + " | ".join(d["classes"]) + " |", "|---|" + "---|" * len(d["classes"])]
    for split, counts in d["class_counts"].items():
        if counts:
            lines.append(f"| {split} | " + " | ".join(str(counts[c]) for c in d["classes"]) + " |")
    lines += ["", "## Training", "", f"- model: {card['model']}, {card['parameters']:,} parameters, strategy {card.get('strategy')}",
              f"- seed {t['seed']}, {t['epochs_run']} epochs run (best {t['best_epoch']}), optimizer {t['optimizer']} lr {t['lr']} "
              f"({t['lr_schedule']}), batch {t['batch_size']}, {t['train_seconds']:.1f} s on {t['world_size']} process(es)",
              f"- augmentation: {json.dumps(t['augmentation']) if t['augmentation'] else 'none'}"]
    if card.get("export"):
        lines += ["", "## Exported artifacts (parity vs PyTorch on real validation images)", "",
                  "| file | precision | MB | max abs diff | top-1 agreement | accuracy |", "|---|---|---|---|---|---|"]
        for a in card["export"]:
            p = a.get("parity") or {}
            lines.append(f"| {a['file']} | {a['precision']} | {a['bytes'] / 1e6:.2f} | {p.get('max_abs_diff', float('nan')):.2e} | "
                         f"{p.get('top1_agreement', float('nan')):.4f} | {fmt(p.get('accuracy'))} |")
    if card.get("benchmarks"):
        lines += ["", "## Benchmarks", "", "| backend | precision | batch | p50 ms | p99 ms | images/s | accuracy |", "|---|---|---|---|---|---|---|"]
        for r in card["benchmarks"]:
            lines.append(f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                         f"{r['throughput_ips']:.0f} | {fmt(r.get('accuracy'))} |")
    return "\n".join(lines) + "\n"


def write_card(folder: Path, card: dict) -> None:
    atomic_write_json(folder / CARD_JSON, card)
    atomic_write_text(folder / CARD_MD, render(card))


def write_model_card(out: Path, dataset, metrics: dict, config: dict, history: list) -> dict:
    card = build_card(dataset, metrics, config, history)
    write_card(Path(out), card)
    return card


def extend_card(run_dir: Path, target: Path, export: Optional[list] = None, benchmarks: Optional[list] = None) -> Optional[dict]:
    """Copy a run's card to ``target`` (a bundle) with export parity and benchmark figures added."""
    src = Path(run_dir) / CARD_JSON
    if not src.is_file():
        return None
    card = json.loads(src.read_text())
    if export is not None:
        card["export"] = export
    if benchmarks is not None:
        card["benchmarks"] = benchmarks
    if (Path(run_dir) / "curves.png").is_file() and Path(target) != Path(run_dir):
        import shutil

        shutil.copyfile(Path(run_dir) / "curves.png", Path(target) / "curves.png")
    write_card(Path(target), card)
    return card
