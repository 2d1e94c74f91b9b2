"""Model commands: `ecgplat models` (list presets) and `ecgplat import fairseq-signals`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ecgplat.cli.apps import app, check_output_path, fail, import_app
from ecgplat.cli.options import json_option


@app.command("models")
def models_cmd(
    as_json: Annotated[bool, json_option("Print a JSON list instead of a table.")] = False,
) -> None:
    """List the encoder presets with their encoder and pretraining-head parameter counts."""
    from training.models import list_presets, preset_summary

    rows = [preset_summary(name) for name in list_presets()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(
        f"{'preset':<8} {'encoder':>12} {'pt-heads':>10} {'D':>5} {'layers':>6} {'attn':>5} "
        f"{'FFN':>5}  description"
    )
    for r in rows:
        typer.echo(
            f"{r['name']:<8} {r['encoder_params'] / 1e6:>10.2f} M "
            f"{r['pretraining_head_params'] / 1e6:>8.2f} M "
            f"{r['embed_dim']:>5} {r['layers']:>6} {r['heads']:>5} {r['ffn_dim']:>5}  "
            f"{r['description']}"
        )


@import_app.command("fairseq-signals")
def import_fairseq_cmd(
    ckpt: Annotated[
        Path,
        typer.Argument(
            help="fairseq-signals wav2vec2 / wav2vec2_cmsc pretraining checkpoint (.pt)."
        ),
    ],
    out: Annotated[
        Path, typer.Argument(help="Where to write the ecgplat checkpoint (kind 'imported').")
    ],
    layer_norm_eps: Annotated[
        float | None,
        typer.Option(
            help="Encoder-layer LayerNorm eps; default: 1e-6 for PAPER-ERA (wav2vec2_clocs) "
            "checkpoints, else 1e-5."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite OUT if it already exists.")
    ] = False,
) -> None:
    """Import a fairseq-signals W2V(+CMSC) checkpoint: encoder, quantizer, project_q, final_proj."""
    if out.exists() and not force:
        fail(f"{out}: already exists (use --force to overwrite)")
    check_output_path(out, "OUT", directory=False)
    from training.models.checkpoint_file import load_checkpoint
    from training.models.fairseq_import import import_fairseq_checkpoint

    try:
        path = import_fairseq_checkpoint(ckpt, out, layer_norm_eps=layer_norm_eps)
    except ValueError as e:
        fail(str(e))
    enc = load_checkpoint(path)["encoder_config"]
    typer.echo(
        f"imported {ckpt.name} -> {path} (D={enc['encoder_embed_dim']}, "
        f"{enc['encoder_layers']} layers, final_dim={enc['final_dim']})"
    )
