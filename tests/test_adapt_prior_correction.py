"""Prior correction in a run's selection: where the target's estimated class mix is credible, the pick
and the reference are written predicting under it (`adapt.candidates.prior_corrected`)."""

import numpy as np
import pytest
import torch

from adaptflow.adapt import candidates as adaptation
from adaptflow.adapt import samples
from adaptflow.manifests import ModelManifest
from adaptflow.store import storage


def _nearest_mean_head(means: torch.Tensor, shift: torch.Tensor | None = None):
    """A linear head whose logits are the nearest-mean classifier's up to a per-image constant
    (x.m - |m|^2 / 2), plus `shift` per class: a source model trained on balanced classes, or (`shift`) one
    pulled towards some classes."""
    from adaptflow.adapt.heads import Head

    head = Head(means.shape[1], means.shape[0])
    with torch.no_grad():
        head.classifier.weight.copy_(means)
        head.classifier.bias.copy_(-0.5 * means.pow(2).sum(1) + (0 if shift is None else shift))
    return head.eval()


def _committed_candidate(root: str, name: str, head, xv, yv, xt) -> adaptation.CandidateManifest:
    """A candidate as `train_candidate` leaves one: its model, its source-validation outputs and its
    probabilities on the target sample."""
    import pyarrow as pa

    from adaptflow.config import Config
    from adaptflow.models.card import ModelCard, save_model

    folder = storage.join(root, name)
    card = ModelCard(
        classes=list("abcd"),
        config=Config(),
        fingerprint="f" * 16,
        dim=xv.shape[1],
        config_hash="c",
        dataset_fingerprint="d",
        metrics={},
    )
    save_model(storage.join(folder, "model"), head, card)
    with torch.no_grad():
        val_logits, target_logits = head(xv), head(xt)
    val = samples.pd.DataFrame(
        {"image_id": [f"v{i:04d}" for i in range(len(yv))], "label": list("abcd"[k] for k in yv)}
    )
    samples.save_outputs(storage.join(folder, "outputs.parquet"), val, val_logits, {c: i for i, c in enumerate("abcd")})
    proba = target_logits.softmax(1).numpy().astype(np.float32)
    storage.write_table(
        storage.join(folder, "predictions.parquet"),
        pa.table(
            {
                "image_id": [f"t{i:04d}" for i in range(len(xt))],
                "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(proba.reshape(-1)), 4),
            }
        ),
    )
    method = name.split("-")[0]
    spec = adaptation.CandidateSpec(name=name, method=method, mode="features", hparams={}, seed=0, steps=1)
    accuracy = float((val_logits.argmax(1) == yv).float().mean())
    return adaptation.CandidateManifest(
        spec=spec,
        model_uri=storage.join(folder, "model"),
        predictions_uri=storage.join(folder, "predictions.parquet"),
        outputs_uri=storage.join(folder, "outputs.parquet"),
        scores={"source_val_acc": accuracy, "im": accuracy},
        collapsed=False,
        source_test_accuracy=accuracy,
        target_accuracy=None,
        domain_gap={},
        curve=[],
        steps=1,
        total_steps=1,
        seconds=0.0,
    )


def test_a_credible_class_mix_gives_a_pick_that_predicts_under_it(tmp_path):
    """A label shift alone (class a is 70% of the target, d absent): the reference's estimate is credible,
    so the pick and the reference are written corrected to it, and the corrected model is Bayes' rule with
    the target's prior: more accurate on the target than the model as trained. Without a place to write
    them, or on a balanced target, the models are the candidates' own."""
    from adaptflow.adapt import priors
    from adaptflow.adapt.inference import load_model

    means = 1.5 * torch.eye(4, 8)
    g = torch.Generator().manual_seed(0)

    def domain(n, mix):
        y = torch.multinomial(torch.tensor(mix), n, replacement=True, generator=g)
        return means[y] + torch.randn(n, 8, generator=g), y

    xv, yv = domain(800, [0.25] * 4)
    xt, yt = domain(1500, [0.7, 0.15, 0.15, 0.0])
    root = str(tmp_path / "candidates")
    faithful = _nearest_mean_head(means)
    pool = [
        _committed_candidate(root, "source_only-features", faithful, xv, yv, xt),
        _committed_candidate(
            root, "dann-features", _nearest_mean_head(means, torch.tensor([-3.0, 1, 1, 1])), xv, yv, xt
        ),
    ]
    head = ModelManifest(model_uri="m", classes=list("abcd"), fingerprint="f", val_accuracy=0.5, epochs=1, seconds=0.0)
    out = str(tmp_path / "corrected")
    picked = adaptation.select_model(head, pool, ["source_val_acc"], "em", 0, [0.25] * 4, out)
    assert picked.name == "source_only-features" and picked.reference_index == 0
    assert picked.model_uri == picked.reference_model_uri == storage.join(out, "source_only-features")
    assert picked.prior_correction == pytest.approx(list(priors.log_ratio(picked.class_mix)))
    model, card = load_model(picked.model_uri)
    assert card.prior_correction == picked.prior_correction
    with torch.no_grad():
        corrected, as_trained = model(xt), faithful(xt)
    assert torch.allclose(corrected, priors.adjust(as_trained, picked.class_mix), atol=1e-5)
    accuracy = lambda logits: float((logits.argmax(1) == yt).float().mean())  # noqa: E731
    assert accuracy(corrected) > accuracy(as_trained) + 0.02

    uncorrected = adaptation.select_model(head, pool, ["source_val_acc"], "em", 0, [0.25] * 4)
    assert uncorrected.model_uri == pool[0].model_uri and uncorrected.prior_correction is None
    xb, _ = domain(1500, [0.25] * 4)
    balanced = [_committed_candidate(str(tmp_path / "b"), "source_only-features", faithful, xv, yv, xb)]
    kept = adaptation.select_model(head, balanced, ["source_val_acc"], "em", 0, [0.25] * 4, out + "-b")
    assert kept.model_uri == balanced[0].model_uri and kept.prior_correction is None
    assert not storage.exists(out + "-b")
