"""The one table of modes (``cavmae.modes``) and every layer that reads it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from cavmae import CAVMAEFT, TINY
from cavmae import modes as m
from cavmae.config import DEFAULT_PREPROCESS
from cavmae.model import MODES
from cavmae.stages import build_stages, make_manifest, modes_for

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER_GRAPHS = {"joint_classifier", "audio_classifier", "visual_classifier"}


def test_table_vocabularies() -> None:
    assert m.REFERENCE_MODES == MODES
    assert set(m.REFERENCE_MODES) == {"multimodal", "audioonly", "videoonly", "missingaudioonly",
                                      "missingvideoonly"}
    assert m.FINETUNE_MODES == ("multimodal", "audioonly", "videoonly")
    assert m.CLI_MODES == ("av", "audio", "visual")
    assert m.cli_modes("multimodal") == ("av", "audio", "visual")
    assert m.cli_modes("audioonly") == ("audio",) and m.cli_modes("videoonly") == ("visual",)
    # the reference names a missing-modality mode by the modality that is given
    assert m.reference_mode("multimodal", "audio") == "missingaudioonly"
    assert m.reference_mode("multimodal", "visual") == "missingvideoonly"
    assert m.reference_mode("audioonly", "audio") == "audioonly"
    assert m.finetune_needs("multimodal") == (True, True)
    assert m.finetune_needs("videoonly") == (False, True)
    assert m.needs("audio") == (True, False) and m.graph_for("av") == "joint_classifier"
    for ft in m.FINETUNE_MODES:
        assert m.finetune_mode_of(m.reference_modes(ft)) == ft
    assert m.finetune_mode_of(()) == "multimodal"
    with pytest.raises(ValueError, match="mode must be one of multimodal, missingaudioonly"):
        m.lookup("video")
    with pytest.raises(ValueError, match="no 'visual' mode"):
        m.reference_mode("audioonly", "visual")


@pytest.mark.parametrize(
    ("supported", "audio", "video", "expected"),
    [
        (("av", "audio", "visual"), True, True, "av"),
        (("av", "audio", "visual"), True, False, "audio"),  # .wav, or a video without frames
        (("av", "audio", "visual"), False, True, "visual"),  # a silent video, an image
        (("audio",), True, True, "audio"),
        (("audio",), False, True, None),  # an audio-only model cannot use a silent video
        (("visual",), True, False, None),
    ],
)
def test_best_mode(supported, audio, video, expected) -> None:
    assert m.best_mode(supported, audio, video) == expected


def test_model_reads_the_table() -> None:
    torch.manual_seed(0)
    model = CAVMAEFT(TINY).eval()
    a = torch.randn(1, TINY.audio_length, TINY.num_mel_bins)
    v = torch.randn(1, 3, TINY.image_size, TINY.image_size)
    with torch.no_grad():
        for row in m.TABLE:
            logits = model(a if row.audio else None, v if row.video else None, row.reference)
            assert logits.shape == (1, TINY.num_classes)
            if row.audio and not row.video:
                with pytest.raises(ValueError, match="needs the audio input"):
                    model(None, v, row.reference)


@pytest.mark.parametrize("finetune", m.FINETUNE_MODES)
def test_exported_graphs_follow_the_table(finetune: str) -> None:
    model = CAVMAEFT(TINY)
    stages = build_stages(model, num_frames=2, max_batch=1, finetune_mode=finetune)
    rows = [r for r in m.TABLE if r.finetune == finetune]
    assert set(stages) & CLASSIFIER_GRAPHS == {r.graph for r in rows}
    for r in rows:
        assert r.reference in stages[r.graph].spec.description or r.graph == "joint_classifier"
    manifest = make_manifest(
        model, {k: s.spec for k, s in stages.items()}, precision="fp32", num_frames=2,
        max_batch=1, task="multi-label", finetune_mode=finetune, labels=None, mask_ratio_a=0.75,
        mask_ratio_v=0.75, preprocess=DEFAULT_PREPROCESS, source={}, versions={},
    )
    assert manifest.modes == m.reference_modes(finetune) == modes_for("classifier", finetune)
    assert m.finetune_mode_of(manifest.modes) == finetune


def test_registry_modes_come_from_the_table() -> None:
    from cavmae.hub.registry import MODELS
    for info in MODELS.values():
        if info.kind == "classifier":
            assert info.modes == m.reference_modes(m.finetune_mode_of(info.modes))
        else:
            assert info.modes == ()


def test_cli_choices_come_from_the_table() -> None:
    from cavmae.cli.classify_cmd import classify
    from cavmae.cli.evaluate_cmd import evaluate
    from cavmae.cli.export_cmd import export

    def choices(cmd, name):
        return tuple(next(p for p in cmd.params if p.name == name).type.choices)

    assert choices(classify, "mode") == (m.AUTO, *m.CLI_MODES)
    assert choices(evaluate, "mode") == m.CLI_MODES
    assert choices(export, "finetune_mode") == (m.AUTO, *m.FINETUNE_MODES)


def _mode_tables(path: Path) -> list[str]:
    """Literal tuples/lists/sets and ``in (...)`` tests naming two or more modes of one vocabulary."""
    vocabularies = (set(m.REFERENCE_MODES), set(m.CLI_MODES))
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            elts = node.keys if isinstance(node, ast.Dict) else node.elts
            names = {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            # "audio"/"visual" alone are ordinary words (index modalities); "av" marks the CLI set
            if len(names & vocabularies[0]) >= 2 or ("av" in names and len(names & vocabularies[1]) >= 2):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_hand_made_mode_tables_outside_the_table() -> None:
    sources = [p for d in ("cavmae", "runtime", "export", "cli") for p in (REPO / d).rglob("*.py")]
    found = [hit for p in sources if p != REPO / "cavmae" / "modes.py" for hit in _mode_tables(p)]
    assert not found, f"mode tables written by hand (read cavmae.modes instead): {found}"


def test_modes_without_a_stream() -> None:
    assert m.modes_without(("av", "audio", "visual"), "audio") == ["visual"]
    assert m.modes_without(("av", "audio", "visual"), "video") == ["audio"]
    assert m.modes_without(("av",), "video") == []
