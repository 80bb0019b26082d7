"""`tts-mirror import-piper`: a command `tts-mirror` finds by its entry point."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("import-piper")
@click.argument("onnx", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("config_json", metavar="JSON", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory for the bundle (then: tts-mirror publish OUT ...).")
@click.option("--bundled", is_flag=True, help="Use the bundled en_US-joe-medium voice instead of ONNX JSON.")
def import_piper_cmd(onnx, config_json, out_dir, bundled) -> None:
    """Convert a Piper voice (ONNX + JSON) into this project's safetensors bundle."""
    if bundled == bool(onnx or config_json):
        raise click.UsageError("give either ONNX and JSON, or --bundled")
    if not bundled and not (onnx and config_json):
        raise click.UsageError("both ONNX and JSON are needed")
    from .importer import bundled_voice_paths, import_piper  # numpy and the runtime's model: only when run

    if bundled:
        onnx, config_json = bundled_voice_paths()
    report = import_piper(Path(onnx), Path(config_json), Path(out_dir))
    unused = list(report.unused or [])
    shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
    click.echo(f"imported {Path(onnx).name} -> {report.out_dir}: {report.mapped} tensors mapped, "
               f"{len(unused)} initializers unused" + (f" ({shown})" if unused else ""))
    shape = report.shape
    click.echo(f"voice shape: quality {shape.get('quality')}, {shape.get('sample_rate')} Hz, "
               f"{shape.get('num_speakers')} speaker(s), language {shape.get('language')}, "
               f"phoneme type {shape.get('phoneme_type')}, resblock {shape.get('resblock')}")
