"""`make demo`'s report.json, assembled from the stages' outputs (the stages themselves run in other tests)."""
import json

from dalle_jax.demo import stages as demo


def _judged(with_pairs: bool, strict: bool = False) -> dict:
    result = dict(accuracy=0.5, count=4, attributes={"color": dict(accuracy=1.0, count=4),
                                                     "relation": dict(accuracy=None, count=0)})
    if strict:
        result.update(exact_accuracy=0.25, spec_accuracy=0.75)
        result["attributes"]["color"].update(exact_accuracy=0.5, spec_accuracy=1.0)
        result["attributes"]["relation"].update(exact_accuracy=None, spec_accuracy=None)
    if with_pairs:
        result["one_object_pairs"] = {"purple circle": dict(accuracy=0.25, count=4, shape=0.5)}
    return dict(settings=dict(temperature=0.7, top_k=8, top_p=1.0, cond_scale=2.0, candidates=4), scorer="reranker",
                sets={"test_compositional": dict(source="split", **result)})


def _stage_outputs(tmp_path):
    (tmp_path / "vqgan").mkdir()
    (tmp_path / "dalle").mkdir()
    (tmp_path / "reranker").mkdir()
    (tmp_path / "reranker" / "test_metrics.json").write_text(json.dumps(dict(step=500, loss=0.23,
                                                                             twin_accuracy=0.44)))
    (tmp_path / "vqgan" / "test_metrics.json").write_text(json.dumps(dict(psnr=31.0, codebook_usage=0.3)))
    (tmp_path / "dalle" / "test_metrics.json").write_text(json.dumps(dict(loss=0.14, token_accuracy=0.97,
                                                                          perplexity=1.15)))
    return str(tmp_path / "vqgan"), str(tmp_path / "dalle"), str(tmp_path / "reranker")


def test_report_holds_every_figure_the_demo_promises(tmp_path):
    timings = dict(wall=6.0, stages={"vqgan": 2.0, "seq2seq": 3.0}, from_empty=True)
    report = demo._report(timings, *_stage_outputs(tmp_path), _judged(with_pairs=True))
    assert report["timings_s"] == timings
    assert report["vqgan"] == dict(psnr=31.0, codebook_usage=0.3)
    assert report["seq2seq"] == dict(eval_loss=0.14, token_accuracy=0.97, perplexity=1.15)
    assert report["judge"]["test_compositional"] == dict(accuracy=0.5, count=4, color=1.0, relation=None,
                                                         one_object_pairs={"purple circle": dict(accuracy=0.25,
                                                                                                 count=4)})
    assert report["reranker"] == dict(eval_loss=0.23, twin_accuracy=0.44)
    assert report["sampling"]["cond_scale"] == 2.0 and report["sampling"]["scorer"] == "reranker"
    json.dumps(report)  # plain JSON types only


def test_report_from_a_judged_file_written_before_pairs_were_reported(tmp_path):
    report = demo._report(dict(wall=1.0, stages={"evaluate": 1.0}, from_empty=True), *_stage_outputs(tmp_path),
                          _judged(with_pairs=False))
    assert report["judge"]["test_compositional"] == dict(accuracy=0.5, count=4, color=1.0, relation=None)


def test_the_time_is_of_this_run_alone_and_reused_stages_are_marked(monkeypatch):
    clock = iter([100.0, 101.0, 104.0, 110.0])  # start, the stage that runs (3 s), the record
    monkeypatch.setattr(demo.time, "perf_counter", lambda: next(clock))
    stages = demo.Stages()
    ran = []
    stages.run("vqgan", True, lambda: ran.append("vqgan"))
    stages.run("seq2seq", False, lambda: ran.append("seq2seq"))
    assert ran == ["seq2seq"]
    assert stages.record() == dict(wall=10.0, stages={"vqgan": None, "seq2seq": 3.0}, from_empty=False)


def test_report_carries_the_exact_and_spec_figures_when_judged_strictly(tmp_path):
    report = demo._report(dict(wall=1.0, stages={}, from_empty=True), *_stage_outputs(tmp_path),
                          _judged(with_pairs=False, strict=True))
    judged = report["judge"]["test_compositional"]
    assert judged["exact_accuracy"] == 0.25 and judged["spec_accuracy"] == 0.75
    assert judged["exact_accuracy_by_attribute"] == {"color": 0.5, "relation": None}
    assert judged["spec_accuracy_by_attribute"] == {"color": 1.0, "relation": None}


def test_pictures_and_judgements_are_made_again_after_retraining_or_with_other_settings(tmp_path):
    import os
    from dalle_jax.inference.sampling import SamplingSettings
    settings = SamplingSettings(temperature=0.7, top_k=8, cond_scale=2.0, candidates=8)
    recorded = dict(temperature=0.7, top_k=8, top_p=1.0, cond_scale=2.0, candidates=8)
    made = tmp_path / "judged.json"
    made.write_text("{}")
    os.utime(made, (1000, 1000))
    assert demo.up_to_date(str(made), 999, recorded, settings)
    assert not demo.up_to_date(str(made), 1001, recorded, settings)  # the reranker was trained again since
    assert not demo.up_to_date(str(made), 999, dict(recorded, cond_scale=1.5), settings)
    assert not demo.up_to_date(str(made), 999, None, settings)  # a grid from before its settings were recorded
    assert not demo.up_to_date(str(tmp_path / "missing.json"), 0, recorded, settings)
