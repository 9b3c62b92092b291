from prefect import flow

from adaptflow import DEFAULT_STORE
from adaptflow.adapt.plan import training_image_size
from adaptflow.config import Config
from adaptflow.manifests import RunData
from adaptflow.names import check_names
from adaptflow.report.summary import StageClock
from adaptflow.store.layout import ingest_uri, model_uri, new_run_id, run_uri
from adaptflow.store.storage import absolute, join
from flows.label import labels_from_a_person
from tasks.adapt import plan_candidates, select_model, split_labels, train_candidates
from tasks.credentials import use_credentials
from tasks.extract import compact_features, extract_all, plan_extraction, record_coverage
from tasks.ingest import check_train_labels, ingest_dataset
from tasks.label import every_label, keep_labels, stored_labels_for
from tasks.logs import forward_library_logs
from tasks.monitor import check_shift, find_champion, promote_if_better, score_champion, score_model
from tasks.predict import evaluate, predict
from tasks.report import publish_run, write_no_shift_summary, write_report, write_summary
from tasks.runners import configured, limited
from tasks.track import track_run
from tasks.train import fit_head


@flow(name="retrain")
def retrain(
    source: str,
    target: str,
    target_labels: str | None = None,
    store: str = DEFAULT_STORE,
    config: Config | None = None,
    target_train_labels: str | None = None,
) -> str:
    """Train a classifier on labeled `source` images for unlabeled `target` images; returns the run URI.
    `target_labels` only score the run; `target_train_labels`, labels of a few target images, also help
    choose its model, and are left out of every target metric it reports.
    With a champion in the store's registry, retrain only if the target shifted or the champion degraded,
    and promote the new model only if it beats the champion on this run's data. The stages run on the
    task runner, and within the time limits, that `config.runtime` names."""
    cfg = check_names(config if config is not None else Config())
    forward_library_logs()
    use_credentials(cfg.runtime.credentials_block)
    return configured(retrain_stages, cfg.runtime)(
        absolute(source),
        absolute(target),
        absolute(target_labels) if target_labels else None,
        absolute(store),
        cfg,
        absolute(target_train_labels) if target_train_labels else None,
    )


@flow(name="retrain-stages")
def retrain_stages(
    source: str, target: str, target_labels: str | None, store: str, cfg: Config, target_train_labels: str | None = None
) -> str:
    run_id = new_run_id()
    run = run_uri(store, run_id)
    clock = StageClock()
    champion = find_champion(store)
    # the long tasks, each failing as TimedOut past runtime.task_timeout_s
    ingest, fit, score, rescore_champion = limited(cfg.runtime, ingest_dataset, fit_head, score_model, score_champion)

    # 1. ingest: validate and index every image, in parallel per dataset (files unchanged since the last run
    # keep their checks); target labels must name source classes; those for training must all be usable,
    # and no target metric counts the images they label
    with clock("ingest"):
        futures = {
            domain: ingest.submit(uri, domain, ingest_uri(run, domain), cfg.ingest, cfg.seed, store=store)
            for domain, uri in (("source", source), ("target", target))
        }
        datasets = {domain: f.result() for domain, f in futures.items()}
        stored = stored_labels_for(store, datasets["target"], join(run, "labels", "stored.csv"))  # given before
        for domain, uri in (
            ("target_labels", target_labels),
            ("target_train_labels", target_train_labels),
            ("stored_labels", stored),
        ):
            if uri:
                datasets[domain] = ingest(
                    uri,
                    domain,
                    ingest_uri(run, domain),
                    cfg.ingest,
                    cfg.seed,
                    classes=datasets["source"].classes,
                    labels_for=datasets["target"].index_uri,
                    store=store,
                )
    src, tgt, labels = datasets["source"], datasets["target"], datasets.get("target_labels")
    # the labels given now and every one given before, for this target; those given now, once checked, are
    # kept in the store for later runs
    given, stored = datasets.get("target_train_labels"), datasets.pop("stored_labels", None)
    train_labels = every_label(given, stored, ingest_uri(run, "target_train_labels_all"))
    fit_labels = judge_labels = None
    if train_labels:
        datasets["target_train_labels"] = train_labels
        labels = check_train_labels(train_labels, tgt, labels, ingest_uri(run, "target_labels_held_out"))
        if given:
            keep_labels(store, given)
        if labels:
            datasets["target_labels"] = labels  # what the run is scored on
        fit_labels, judge_labels = split_labels(train_labels, cfg, join(run, "labels"))  # train on / choose by

    # 2-3. preprocess + extract: embed only images the feature store lacks (the champion's reference
    # images included), and decode each once into the training-image cache when candidates train end to
    # end; shard by shard; merge small shards
    specs = plan_candidates(cfg, src)
    with clock("extract"):
        reference = [champion.reference_index_uri] if champion and champion.reference_index_uri else []
        plan = plan_extraction(
            [src.index_uri, tgt.index_uri, *reference],
            store,
            cfg.backbone,
            cfg.extract.shard_size,
            cache_size=training_image_size(specs),
            index_keys=[src.fingerprint, tgt.fingerprint, *(champion.reference_keys if champion else [])],
        )
        shards = extract_all(plan, cfg.backbone, cfg.extract, cfg.runtime)
        compaction = compact_features(plan.features_uri, cfg.extract)
        compactions = [compaction, *([compact_features(plan.cache.uri, cfg.extract)] if plan.cache else [])]
        record_coverage(plan, store, compactions)  # what the store now holds whole: a quiet night lists it

    data = RunData(source=src, target=tgt, target_labels=labels, features=plan)  # what the stages below share

    # 3b. monitor: has the target moved away from the champion's data, or the champion got worse, or are there
    # new labels for training? If not, stop
    shift = champion_scores = None
    if champion:
        with clock("monitor"):
            champion_scores = rescore_champion(store, champion, data, cfg)
            if cfg.monitor.enabled:
                shift = check_shift(store, champion, tgt, plan, champion_scores, cfg, train_labels)
        if shift and not shift.retrain:
            summary = write_no_shift_summary(
                run_id, run, cfg, datasets, plan, shards, compaction, shift, champion_scores, clock.seconds
            )
            publish_run(summary, store)
            track_run(summary, store, cfg.tracking)  # 7. mirror to MLflow, when tracking is on
            return run
        if champion_scores is not None and champion_scores.reused not in (None, 1.0):  # the gate: this sample
            champion_scores = rescore_champion(store, champion, data, cfg, exact=True)

    # 4. fine-tune and adapt: the source-only head, then adaptation candidates for a fixed number of steps
    # (end-to-end ones in rounds of successive halving), chosen without target labels unless some were
    # given for training (then a share trains every candidate, the rest judges them)
    with clock("train"):
        head = fit(src, plan, cfg, model_uri(store, run_id))
        candidates = train_candidates(specs, data, cfg, store, fit_labels, judge_labels)
        selection = select_model(head, candidates, cfg, src, join(run, "prior-corrected"), judge_labels, plan)

    # 5. evaluate: the chosen model and the source-only head on source test and target, shard by shard
    with clock("evaluate"):
        predictions = predict(
            selection.model_uri, tgt, plan, join(run, "predictions.parquet"), cfg.extract, cfg.runtime
        )
        test = predict(
            selection.model_uri, src, plan, join(run, "source_test.parquet"), cfg.extract, cfg.runtime, split="test"
        )
        evaluation = evaluate(src, test, predictions, labels, src.classes, join(run, "metrics.json"))
        baseline = predict(
            head.model_uri, tgt, plan, join(run, "baseline", "predictions.parquet"), cfg.extract, cfg.runtime
        )
        baseline_test = predict(
            head.model_uri,
            src,
            plan,
            join(run, "baseline", "source_test.parquet"),
            cfg.extract,
            cfg.runtime,
            split="test",
        )
        baseline_evaluation = evaluate(
            src, baseline_test, baseline, labels, src.classes, join(run, "baseline", "metrics.json")
        )
        report = write_report(run, data, candidates, selection, evaluation, baseline_evaluation)

    # 6. promote: register the chosen model; the gate compares it with the champion on this run's data
    with clock("promote"):
        challenger = score(selection.model_uri, data, cfg, store)
        promotion = promote_if_better(
            store,
            run_id,
            selection,
            datasets,
            plan,
            cfg,
            challenger,
            champion_scores,
            evaluation.source_test.accuracy,
        )

    summary = write_summary(
        run_id,
        run,
        cfg,
        datasets,
        plan,
        shards,
        compaction,
        head,
        candidates,
        selection,
        [predictions, test, baseline, baseline_test],
        evaluation,
        baseline_evaluation,
        report,
        clock.seconds,
        shift,
        champion_scores,
        challenger,
        promotion,
    )
    publish_run(summary, store)
    track_run(summary, store, cfg.tracking)  # 7. mirror to MLflow, when tracking is on

    # 8. a person in the loop (labeling.ask): labels of the images most worth them, then the run again with
    # every label the store holds; no answer in time, and this run stands
    if cfg.labeling.ask and labels_from_a_person(run, store, cfg):
        again = cfg.model_copy(update={"labeling": cfg.labeling.model_copy(update={"ask": 0})})
        return retrain_stages(source, target, target_labels, store, again, None)
    return run
