from pathlib import Path

import pytest
import yaml

from conftest import REPO, repo_params_raw
from mnist_cnn.cli import main, parse_overrides
from mnist_cnn.core.errors import masked
from mnist_cnn.core.params import ConfigError, flatten, load_params, parse_params, yaml_load
from mnist_cnn.core.search import load_tune


def test_params_yaml_holds_the_seed_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.data.dataset == "mnist"
    assert (params.model.hidden_1, params.model.hidden_2, params.model.hidden_3) == (48, 48, 112)
    assert (params.model.dropout1, params.model.dropout2) == (0.0, 0.17)
    t = params.train
    assert (t.batch_size, t.epochs, t.lr, t.val_split, t.patience) == (64, 50, 0.43, 0.2, 15)
    assert params.evaluate.batch_size == 1000
    assert params.mlflow.registered_model == "mnist-cnn"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.lr", -1, "train.lr = -1.0: expected a number > 0"),
        ("train.val_split", 1.0, "train.val_split = 1.0: expected a number in (0, 1)"),
        ("train.epochs", 2.5, "train.epochs = 2.5: expected an integer"),
        ("train.batch_size", True, "train.batch_size = True: expected an integer"),
        ("model.dropout2", 1.0, "model.dropout2 = 1.0: expected a number in [0, 1)"),
        ("data.dataset", "cifar", "data.dataset = 'cifar': expected mnist | fashion-mnist"),
        ("train.device", "tpu", "train.device = 'tpu': expected auto | cpu | cuda | mps"),
        ("train.precision", "int8", "train.precision = 'int8': expected auto | fp32 | bf16 | fp16"),
    ],
)
def test_bad_values_name_key_value_and_expectation(key, value, message):
    with pytest.raises(ConfigError) as info:
        parse_params(repo_params_raw(), {key: value})
    assert str(info.value) == message


def test_unknown_and_missing_keys_are_named(tmp_path):
    raw = repo_params_raw()
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"^train\.learning_rate: unknown key"):
        parse_params(raw)
    raw = repo_params_raw()
    del raw["model"]["hidden_3"]
    with pytest.raises(ConfigError, match=r"^model\.hidden_3: missing key$"):
        parse_params(raw)
    with pytest.raises(ConfigError, match=r"nope\.yaml: params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_take_short_and_dotted_names_as_strings():
    params = parse_params(repo_params_raw(), {"lr": "0.2", "train.epochs": "3", "dropout1": "0.25"})
    assert (params.train.lr, params.train.epochs, params.model.dropout1) == (0.2, 3, 0.25)
    with pytest.raises(ConfigError, match=r"^learning_rate: unknown parameter"):
        parse_params(repo_params_raw(), {"learning_rate": "0.2"})


def test_flatten_gives_dotted_keys_for_every_value():
    flat = flatten(load_params(REPO / "params.yaml"))
    assert flat["train.lr"] == 0.43 and flat["model.hidden_3"] == 112 and flat["data.dataset"] == "mnist"
    assert len(flat) == len(set(flat))


def test_cli_override_parsing_skips_empty_values():
    assert parse_overrides(["--epochs", "3", "--lr", "", "train.seed=4"]) == {
        "epochs": "3",
        "train.seed": "4",
    }


def test_cli_bad_param_is_one_line_and_exit_2(tmp_path: Path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("lr: 0.43", "lr: fast"))
    code = main(["train", "--params", str(params), "--root", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"error: {params}: train.lr = 'fast': expected a number"
    assert not (tmp_path / "models").exists()


def test_one_line_takes_the_first_line_mlflows_message_or_the_type():
    from mlflow.exceptions import MlflowException

    from mnist_cnn.core.errors import one_line

    assert one_line(ValueError("\n  bad value\nTraceback (most recent call last): ...")) == "bad value"
    assert one_line(MlflowException("no such model\nmore")) == "no such model"
    assert one_line(OSError()) == "OSError"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://bob:s3cret@db/optuna", "postgresql://bob:***@db/optuna"),
        ("http://bob:p@ss@127.0.0.1:5000", "http://bob:***@127.0.0.1:5000"),  # a raw @ in the password
        ("postgresql://bob:a/b+c==@db:5432/optuna", "postgresql://bob:***@db:5432/optuna"),  # base64's /
        ("http://bob:1234@h:5000", "http://bob:***@h:5000"),
        ("url: http://bob:p@ss@h:1/api/x (Caused by a@b)", "url: http://bob:***@h:1/api/x (Caused by a@b)"),
        ("postgresql://u:1234/x@h/db", "postgresql://u:***@h/db"),  # leading digits, then a /
        ("postgresql://:secret@h/db", "postgresql://:***@h/db"),  # no user name
        ("http://[::1]:5000/p@x", "http://[::1]:5000/p@x"),  # an IPv6 host, no password: untouched
        ("http://127.0.0.1:5000/x@y", "http://127.0.0.1:***@y"),  # no password, but never risk showing one
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_masked_hides_the_whole_password(text, shown):
    assert masked(text) == shown


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 0.43\n  epochs: 3\n  lr: 0.1\n")  # PyYAML alone would keep 0.1
    with pytest.raises(ConfigError) as caught:
        load_params(params)
    assert str(caught.value) == f"{params}: not valid YAML (duplicate key 'lr' (first on line 2), line 4 column 3)"


def test_merge_keys_still_load_and_may_be_overridden(tmp_path: Path):
    params = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    text = text.replace("model.dropout1: {low: 0.0, high: 0.5}", "model.dropout1: &drop {low: 0.0, high: 0.5}")
    text = text.replace("model.dropout2: {low: 0.0, high: 0.5}", "model.dropout2: {<<: *drop, high: 0.4}")
    params.write_text(text)
    assert "*drop" in text
    space = {p.key: p for p in load_tune(params, load_params(params)).space}
    assert (space["model.dropout2"].low, space["model.dropout2"].high) == (0.0, 0.4)
    assert (space["model.dropout1"].low, space["model.dropout1"].high) == (0.0, 0.5)


@pytest.mark.parametrize(
    ("text", "loaded"),
    [
        # An anchored mapping merged before its own merge is read (PyYAML rewrites it in place): DVC loads it.
        (
            "train:\n  sched: &s {lr: 1.0}\n  fast: &f {<<: *s, lr: 2.0}\nevaluate: {<<: *f}\n",
            {"train": {"sched": {"lr": 1.0}, "fast": {"lr": 2.0}}, "evaluate": {"lr": 2.0}},
        ),
        ("a: &a {x: 1}\nb: {<<: [*a], x: 3}\n", {"a": {"x": 1}, "b": {"x": 3}}),
    ],
)
def test_merges_are_not_duplicates(text, loaded):
    assert yaml_load(text) == loaded


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: &a {x: 1}\nb: &b {y: 2}\nc: {<<: *a, <<: *b}\n", "duplicate key '<<' (first on line 3)"),  # as DVC
        ("a:\n- {x: 1, x: 2}\n", "duplicate key 'x' (first on line 2)"),
    ],
)
def test_duplicates_are_refused_wherever_they_are(text, problem):
    with pytest.raises(yaml.YAMLError) as caught:
        yaml_load(text)
    assert caught.value.problem == problem


def test_an_unclosed_quote_names_where_it_opened(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text('data:\n  dataset: "mnist\ntrain:\n  lr: 0.43\n')
    with pytest.raises(ConfigError) as caught:
        load_params(params)
    assert str(caught.value) == (
        f"{params}: not valid YAML (found unexpected end of stream, line 5 column 1; "
        "while scanning a quoted scalar at line 2 column 12)"
    )


def test_invalid_yaml_names_the_problem_and_its_line(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 0.43\n\tepochs: 3\n")  # a tab where YAML wants spaces
    with pytest.raises(ConfigError) as caught:
        load_params(params)
    assert str(caught.value) == (
        f"{params}: not valid YAML (found character '\\t' that cannot start any token, line 3 column 1)"
    )
