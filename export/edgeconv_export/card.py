"""The model card of an imported bundle: where the model came from and how each artifact compares with it."""
from __future__ import annotations

import json
from pathlib import Path

from edgeconv_runtime.fileio import atomic_write_json, atomic_write_text
from edgeconv_runtime.manifest import Manifest

CARD_JSON, CARD_MD = "model_card.json", "MODEL_CARD.md"


def import_card(manifest: Manifest, import_seconds: float) -> dict:
    return {
        "model": manifest.name,
        "strategy": "imported",
        "source": manifest.source,
        "classes": manifest.classes,
        "preprocess": manifest.preprocess,
        "parity": manifest.parity,
        "calibration": manifest.calibration and {k: manifest.calibration[k] for k in ("method", "images", "source") if k in manifest.calibration},
        "import_seconds": import_seconds,
        "export": [a.to_dict() for a in manifest.artifacts],
    }


def render_import_card(card: dict) -> str:
    src, par = card["source"], card["parity"]
    lines = [f"# Model card: {card['model']} (imported)", "",
             f"- source: `{src.get('imported') or src.get('module')}`" + (f" (sha256 `{src['sha256']}`)" if src.get("sha256") else ""),
             f"- classes ({len(card['classes'])}): {', '.join(card['classes'][:20])}{' ...' if len(card['classes']) > 20 else ''}",
             f"- preprocessing: `{json.dumps(card['preprocess'])}`"]
    lines += [f"- {note}" for note in src.get("notes", [])]
    lines += ["", f"## Artifacts (parity vs {par.get('reference')} on {par.get('images')} real images, {src.get('parity_labels', 'class folders')})", "",
              "| file | precision | MB | max abs diff | min cosine | top-1 agreement |", "|---|---|---|---|---|---|"]
    for a in card["export"]:
        p = a.get("parity") or {}
        lines.append(f"| {a['file']} | {a['precision']} | {a['bytes'] / 1e6:.2f} | {p.get('max_abs_diff', float('nan')):.2e} | "
                     f"{p.get('cosine_min', float('nan')):.5f} | {p.get('top1_agreement', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"


def write_import_card(bundle: Path, manifest: Manifest, import_seconds: float) -> dict:
    card = import_card(manifest, import_seconds)
    atomic_write_json(bundle / CARD_JSON, card)
    atomic_write_text(bundle / CARD_MD, render_import_card(card))
    return card
