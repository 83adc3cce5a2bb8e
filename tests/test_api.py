"""The Python API (issue 20): each command as a function, the same results as the CLI, UserError on mistakes."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_MODEL, write_images
from test_evaluate import save_tiny, write_colour_set

import mimkit
from mimkit.cli import main
from mimkit.errors import ConfigError, UserError

SEG_TINY = dict(random_init=True, patch_size=8, input_size=32, batch_size=8,
                num_workers=0, test_mode="whole", max_iters=2, amp="off")
SEG_DICT = {"model": {"type": "mae_vit_tiny_patch16", "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
                                 "decoder_depth": 1, "decoder_num_heads": 2}, "channels": 16, "aux_channels": 8},
            "logging": {"tensorboard": False}, "test": {"num_overlays": 0}}


def _words(flags: dict) -> list[str]:
    words = []
    for k, v in flags.items():
        words += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return words


def _no_folder(d):
    """A config without its output folder (the one setting that differs between the two runs)."""
    if isinstance(d, dict):
        return {k: _no_folder(v) for k, v in d.items() if k != "output_dir"}
    return d


def _same_metrics(a: dict, b: dict) -> None:
    assert a["command"] == b["command"] and a["metrics"] == b["metrics"]
    assert _no_folder(a["config"]) == _no_folder(b["config"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    return save_tiny(d / "tiny.pt"), write_colour_set(d / "data"), d


def test_knn_and_rankme_match_the_cli(tiny) -> None:
    ckpt, data, d = tiny
    flags = dict(checkpoint=str(ckpt), data_path=str(data), batch_size=4, num_workers=0)
    run = mimkit.knn(**flags, k=[1, 3], output_dir=str(d / "knn_api"))
    assert run.exit_code == 0 and run.output_dir == d / "knn_api" and run.command == "knn"
    assert main(["knn", *_words(flags), "--k", "1", "3", "--output_dir", str(d / "knn_cli")]) == 0
    _same_metrics(run.results, json.loads((d / "knn_cli" / "results.json").read_text()))
    assert set(run.results["metrics"]) == {"knn_top1_k1", "knn_top1_k3"}
    again = mimkit.knn(**flags, k=[1, 3], output_dir=str(d / "knn_api"))  # an evaluation adds results-2.json
    assert again.results == json.loads((d / "knn_api" / "results-2.json").read_text())
    rank = mimkit.rankme(**flags, output_dir=str(d / "rank"))
    assert rank.results["command"] == "rankme" and rank.results["metrics"]


def test_linprobe_and_finetune_match_the_cli(tiny) -> None:
    ckpt, data, d = tiny
    common = dict(finetune=str(ckpt), data_path=str(data), epochs=1, warmup_epochs=0, batch_size=8, device="cpu",
                  num_workers=0, input_size=32)
    lp = mimkit.linprobe(**common, opt="sgd", no_aug=True, output_dir=str(d / "lp_api"))
    assert main(["linprobe", *_words({**common, "opt": "sgd", "no_aug": True}), "--output_dir", str(d / "lp_cli")]) == 0
    _same_metrics(lp.results, json.loads((d / "lp_cli" / "results.json").read_text()))
    assert lp.checkpoint is None or lp.checkpoint.is_file()
    ft = mimkit.finetune(**common, aa="none", reprob=0, output_dir=str(d / "ft_api"))
    assert main(["finetune", *_words({**common, "aa": "none", "reprob": 0}), "--output_dir", str(d / "ft_cli")]) == 0
    _same_metrics(ft.results, json.loads((d / "ft_cli" / "results.json").read_text()))


def test_pretrain_dict_config_sits_where_a_file_does(tmp_path) -> None:
    write_images(tmp_path / "imgs", 8)
    kw = dict(data_path=str(tmp_path / "imgs"), batch_size=4, num_workers=0, epochs=1, max_steps=2, amp="off",
              model="mae_vit_tiny_patch16", input_size=32, patch_size=8)
    model_kw = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
                "decoder_num_heads": 2}
    config = {"model": {"kwargs": model_kw}, "optimization": {"base_lr": 5e-4}}
    run = mimkit.pretrain(config, **kw, output_dir=str(tmp_path / "api"))
    f = tmp_path / "c.yaml"
    f.write_text(json.dumps(config))  # JSON is YAML
    assert main(["pretrain", str(f), *_words(kw), "--output_dir", str(tmp_path / "cli")]) == 0
    losses = [r["loss"] for r in run.metrics if r["kind"] == "step"]
    assert losses and losses == [json.loads(x)["loss"] for x in (tmp_path / "cli" / "metrics.jsonl").read_text()
                                 .splitlines() if json.loads(x)["kind"] == "step"]
    assert run.checkpoint == tmp_path / "api" / "checkpoints" / "final.pt"
    # a flag beats the dict (a config file's place), as on the command line
    flag = mimkit.pretrain({**config, "schedule": {"epochs": 5}}, **kw, output_dir=str(tmp_path / "api2"))
    from omegaconf import OmegaConf
    assert OmegaConf.load(flag.output_dir / "config.yaml").schedule.epochs == 1


def test_segment_incremental_continual_and_export(tmp_path, tiny) -> None:
    ckpt, data, _ = tiny
    seg = mimkit.segment(SEG_DICT, **SEG_TINY, output_dir=str(tmp_path / "seg_api"))
    f = tmp_path / "seg.json"
    f.write_text(json.dumps(SEG_DICT))  # the dict stands where a config file does
    assert main(["segment", str(f), *_words(SEG_TINY), "--output_dir", str(tmp_path / "seg_cli")]) == 0
    _same_metrics(seg.results, json.loads((tmp_path / "seg_cli" / "results.json").read_text()))
    assert "mIoU" in seg.results["metrics"]
    inc = mimkit.incremental(data_path="digits", tasks=2, nf=4, input_size=8, epochs=1, batch_size=64, device="cpu",
                             output_dir=str(tmp_path / "inc"))
    assert inc.results["command"] == "incremental" and inc.results["accuracy_matrix"]["stages"] == ["after_task_0", "after_task_1"]
    assert inc.results["metrics"]["tasks_done"] == 2 and inc.output_dir == tmp_path / "inc"
    cont = mimkit.continual(domains=[str(data)], continual_checkpoint=str(ckpt), batch_size=4, num_workers=0,
                            epochs=1, amp="off", output_dir=str(tmp_path / "cont"))
    assert cont.output_dir == tmp_path / "cont" and "recon_loss" in cont.results
    exp = mimkit.export(ckpt, format="safetensors", output=str(tmp_path / "enc.safetensors"))
    assert exp.output_dir == tmp_path / "enc.safetensors" and exp.results["ok"] is True


def test_mistakes_raise_user_error_and_never_exit(tmp_path) -> None:
    with pytest.raises(UserError, match="unknown flag 'epocs'.*did you mean 'epochs'"):
        mimkit.pretrain(epocs=1)
    with pytest.raises(UserError, match="epochs: invalid int value"):
        mimkit.pretrain(epochs="many")
    with pytest.raises(ConfigError, match="unknown config key 'schedule.epocs'"):
        mimkit.pretrain({"schedule": {"epocs": 1}}, output_dir=str(tmp_path / "x"))
    with pytest.raises(UserError, match="config file not found"):
        mimkit.pretrain("nope.yaml")
    with pytest.raises(UserError, match="unknown command 'pretrian'.*pretrain"):
        mimkit.call("pretrian")
    with pytest.raises(UserError, match="norm_pix_loss"):
        mimkit.pretrain(norm_pix_loss=False)  # the flag only sets true: say where to set false
    assert not (tmp_path / "x").exists()


def test_the_cli_runs_through_the_api(monkeypatch, tmp_path) -> None:
    import mimkit.api as api
    import mimkit.cli as cli

    seen = []
    real = api.run_args
    monkeypatch.setattr(cli, "run_args", lambda args: seen.append(args.command) or real(args))
    assert cli.main(["models"]) == 0 and seen == ["models"]


def test_python_wording_for_python_mistakes(tmp_path) -> None:
    """Errors name keywords, not command-line flags (new-user trial)."""
    with pytest.raises(UserError, match=r"mimkit.pretrain\(\): epochs: invalid int value"):
        mimkit.pretrain(epochs="two")
    with pytest.raises(UserError, match=r"epochs=\[1, 2\]\): --epochs takes one value"):
        mimkit.pretrain(epochs=[1, 2])
    with pytest.raises(UserError, match=r"mimkit.export\(\): missing required argument\(s\): format"):
        mimkit.export(tmp_path / "x.pt")
    with pytest.raises(UserError, match=r"help\(mimkit.pretrain\)"):
        mimkit.pretrain(help=True)
    with pytest.raises(UserError, match=r"unknown config key 'epochs' \(did you mean 'schedule.epochs'\?\)"):
        mimkit.pretrain({"epochs": 1})


def test_summaries_come_back_where_no_results_file_is_written(tmp_path) -> None:
    write_images(tmp_path / "imgs", 6)
    st = mimkit.stats(data_path=str(tmp_path / "imgs"))
    assert st.results["images"] == 6 and len(st.results["mean"]) == 3 and all(s > 0 for s in st.results["std"])
    sh = mimkit.shards(tmp_path / "imgs", tmp_path / "sh", shard_size=4)
    assert sh.output_dir == tmp_path / "sh" and sh.results["train"]["count"] == 6
    run = mimkit.pretrain(data_path=str(tmp_path / "imgs"), batch_size=3, num_workers=0, epochs=1,
                          max_steps=1, amp="off", model="mae_vit_tiny_patch16", input_size=32, patch_size=8,
                          output_dir=str(tmp_path / "p"))
    assert run.results["steps"] == 1 and run.results["final_loss"] == run.metrics[-1]["loss"]
    assert run.checkpoint == tmp_path / "p" / "checkpoints" / "final.pt"
