"""The network, the training loop, its schedules and augmentation, and evaluate: in process, no MLflow."""

import dataclasses
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_OVERRIDES, repo_params_raw
from mnist_cnn.core import epoch, files
from mnist_cnn.core.augment import Distortions, _elastic_field, random_distort, shift
from mnist_cnn.core.data import DataError, Tensors, load_train_val
from mnist_cnn.core.inference import loss_and_accuracy, predict_log_probs
from mnist_cnn.core.loop import EpochStats, _Loop, fit
from mnist_cnn.core.model import Net, load_weights
from mnist_cnn.core.optim import make_optimizer, monitor_value
from mnist_cnn.core.params import ConfigError, ModelConfig, OptimizerConfig, SchedulerConfig, parse_params
from mnist_cnn.core.runtime import select_device, select_precision
from mnist_cnn.stages.evaluate import evaluate
from mnist_cnn.stages.train import train

# One worker (pytest-xdist) for the whole module: its tests share a module-scoped fixture.
pytestmark = pytest.mark.xdist_group("train-evaluated")


def test_seed_architecture_and_shapes(seed_params):
    net = Net(seed_params.model)
    assert net.fc1.in_features == 6912 and net.fc1.out_features == 112
    assert net.conv1.out_channels == 48 and net.conv2.out_channels == 48
    out = net(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(3), atol=1e-5)  # log-probabilities


def test_padding_keeps_the_maps_28_wide_and_an_old_architecture_loads_without_it(seed_params, tmp_path):
    padded = Net(dataclasses.replace(seed_params.model, padding=1))
    assert padded.fc1.in_features == 48 * 14 * 14 and padded.conv1.padding == (1, 1)
    assert padded(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # A model registered before `padding` existed stored its architecture without the key.
    new_keys = ("padding", "kernel_size", "dilation")
    old = {k: v for k, v in dataclasses.asdict(seed_params.model).items() if k not in new_keys}
    torch.save(Net(seed_params.model).state_dict(), tmp_path / "old.pt")
    assert load_weights(ModelConfig(**old), tmp_path / "old.pt").fc1.in_features == 6912


@pytest.mark.parametrize(
    ("change", "in_features"),
    [
        ({"kernel_size": 5}, 48 * 10 * 10),  # 28 > 24 > 20 > pooled 10
        ({"dilation": 2}, 48 * 11 * 11),  # 28 > 26 > 22 > pooled 11
        ({"kernel_size": 5, "dilation": 2, "padding": 1}, 48 * 10 * 10),  # 28 > 26 > 20 > pooled 10
    ],
)
def test_wider_kernels_and_dilation_size_fc1_to_the_pooled_map(seed_params, change, in_features):
    net = Net(dataclasses.replace(seed_params.model, **change))
    assert net.fc1.in_features == in_features
    assert net.conv1.kernel_size == net.conv2.kernel_size == (change.get("kernel_size", 3),) * 2
    assert net.conv2.dilation == (change.get("dilation", 1),) * 2 and net.conv1.dilation == (1, 1)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_split_is_80_20_and_disjoint(project, tiny_params):
    train_data, val_data = load_train_val(project.data, "mnist", 0.2, seed=1, device=torch.device("cpu"))
    assert (len(train_data.y), len(val_data.y)) == (1200, 300)
    again, _ = load_train_val(project.data, "mnist", 0.2, seed=1, device=torch.device("cpu"))
    assert torch.equal(train_data.x, again.x)
    other, _ = load_train_val(project.data, "mnist", 0.2, seed=2, device=torch.device("cpu"))
    assert not torch.equal(train_data.y, other.y)


def train_and_shuffled_val(data_dir) -> tuple[Tensors, Tensors]:
    """The tiny split with its validation labels shuffled: no real pattern to learn there, so the
    validation loss is best after the first epoch and only worsens as the model grows confident."""
    train_data, val_data = load_train_val(data_dir, "mnist", 0.2, 1, torch.device("cpu"))
    shuffled = val_data.y[torch.randperm(len(val_data.y), generator=torch.Generator().manual_seed(0))]
    return train_data, Tensors(val_data.x, shuffled)


def test_early_stopping_stops_and_restores_the_best_epoch(project, tiny_params):
    """Validation labels are shuffled: the model gets more confident on the real pattern, so the
    validation loss is best early and then only worsens; training must stop `patience` epochs later
    with the best epoch's weights."""
    cfg = dataclasses.replace(tiny_params.train, epochs=20, patience=2)
    params = dataclasses.replace(tiny_params, train=cfg)
    train_data, noisy_val = train_and_shuffled_val(project.data)
    net, result = fit(params, train_data, noisy_val, torch.device("cpu"), "fp32", show_progress=False)
    losses = [s.val_loss for s in result.history]
    assert result.stopped_epoch < cfg.epochs
    assert result.stopped_epoch == result.best_epoch + cfg.patience
    assert result.best_epoch == 1 + losses.index(min(losses))
    restored_loss, _ = loss_and_accuracy(predict_log_probs(net, noisy_val.x, 500), noisy_val.y)
    assert restored_loss == pytest.approx(losses[result.best_epoch - 1], rel=1e-5)
    assert restored_loss != pytest.approx(losses[-1], rel=1e-3)


def test_monitor_val_acc_keeps_the_most_accurate_epoch_ties_to_the_lower_loss(project, tiny_params):
    cfg = dataclasses.replace(tiny_params.train, epochs=6, patience=2, monitor="val_acc")
    params = dataclasses.replace(tiny_params, train=cfg)
    train_data, noisy_val = train_and_shuffled_val(project.data)
    net, result = fit(params, train_data, noisy_val, torch.device("cpu"), "fp32", show_progress=False)
    ranked = [(s.val_acc, -s.val_loss) for s in result.history]
    assert result.best_epoch == 1 + ranked.index(max(ranked))
    assert result.stopped_epoch == min(cfg.epochs, result.best_epoch + cfg.patience)
    restored_loss, restored_acc = loss_and_accuracy(predict_log_probs(net, noisy_val.x, 500), noisy_val.y)
    best = result.history[result.best_epoch - 1]
    assert (restored_loss, restored_acc) == (pytest.approx(best.val_loss, rel=1e-5), pytest.approx(best.val_acc))


def test_monitor_rules_on_ties_and_a_diverged_epoch():
    loop = _Loop(None, None, None, None, None, history=[])
    stats = lambda loss, acc: EpochStats(1, 0.0, 0.0, loss, acc, 0.1, 0.0)  # noqa: E731
    assert not loop.improves(stats(float("nan"), 99.0), "val_acc")  # a diverged net is never kept
    assert loop.improves(stats(0.5, 90.0), "val_acc")
    loop.best_loss, loop.best_acc = 0.5, 90.0
    assert loop.improves(stats(0.4, 90.0), "val_acc") and not loop.improves(stats(0.6, 90.0), "val_acc")
    assert loop.improves(stats(0.9, 90.1), "val_acc") and not loop.improves(stats(0.9, 90.1), "val_loss")
    assert loop.improves(stats(0.4, 10.0), "val_loss") and not loop.improves(stats(0.5, 99.0), "val_loss")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_mirror):
    """One training of the tiny params, and its evaluation: read by the tests below, never changed."""
    root = tmp_path_factory.mktemp("evaluated")
    params = parse_params(repo_params_raw(), TINY_OVERRIDES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNIST_MD5S", str(tiny_mirror.parent / "md5s.json"))
        trained = train(params, tiny_mirror, root / "models", root / "reports", show_progress=False)
        _, evaluation = evaluate(params, tiny_mirror, root / "models", root / "reports")
    return SimpleNamespace(models=root / "models", reports=root / "reports", trained=trained, evaluation=evaluation)


def test_same_params_same_metrics_to_the_last_digit(project, tiny_params, tmp_path, evaluated):
    first = evaluated.trained  # the same params, trained in another directory
    second = train(tiny_params, project.data, tmp_path / "b", tmp_path / "rb", show_progress=False)
    strip = lambda h: [dataclasses.replace(s, epoch_seconds=0.0) for s in h]  # noqa: E731
    assert strip(first.history) == strip(second.history)
    assert (evaluated.models / "model.pt").read_bytes() != b""
    a = torch.load(evaluated.models / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    eval_a = evaluated.evaluation
    _, eval_b = evaluate(tiny_params, project.data, tmp_path / "b", tmp_path / "rb")
    assert (evaluated.reports / "metrics.json").read_text() == (tmp_path / "rb" / "metrics.json").read_text()
    assert eval_a.metrics == eval_b.metrics


def test_evaluate_writes_seed_table_confusion_rows_and_report(evaluated):
    reports, result = evaluated.reports, evaluated.evaluation
    metrics = json.loads((reports / files.METRICS.name).read_text())
    assert set(metrics) == {"train", "val", "test"}
    for split in metrics.values():
        assert set(split) == {"loss", "accuracy"} and 0 <= split["accuracy"] <= 100
    rows = (reports / files.PREDICTIONS.name).read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 1 + 297
    correct = sum(a == p for a, p in (r.split(",") for r in rows[1:]))
    assert 100.0 * correct / 297 == pytest.approx(metrics["test"]["accuracy"], abs=1e-3)
    assert result.confusion.sum() == 297 and result.confusion.trace() == correct
    assert "precision" in (reports / files.CLASSIFICATION_REPORT.name).read_text()


def test_evaluate_without_weights_names_the_missing_file(project, tiny_params, evaluated):
    with pytest.raises(DataError, match=r"model\.pt: trained weights not found \(run the train stage first\)"):
        evaluate(tiny_params, project.data, project.models, project.reports)
    wider = dataclasses.replace(tiny_params, model=dataclasses.replace(tiny_params.model, hidden_3=64))
    shutil.copytree(evaluated.models, project.models)  # trained with tiny_params
    with pytest.raises(DataError, match=r"model\.pt: weights do not fit the model in params.yaml"):
        evaluate(wider, project.data, project.models, project.reports)


def test_device_and_precision_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in {"cuda", "mps", "cpu"}
    cpu = torch.device("cpu")
    assert select_precision("fp32", cpu) == "fp32"
    assert select_precision("auto", cpu) in {"fp32", "bf16"}
    with pytest.raises(RuntimeError, match="fp16.*CUDA only"):
        select_precision("fp16", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="train.device = 'cuda': no such device"):
            select_device("cuda")


def test_plateau_schedule_cuts_lr_after_stalled_epochs(project, tiny_params):
    """Shuffled validation labels make every epoch after the first a stall."""
    cfg = dataclasses.replace(
        tiny_params.train, epochs=5, patience=10, scheduler=SchedulerConfig("plateau", gamma=0.5, patience=1)
    )
    train_data, noisy_val = train_and_shuffled_val(project.data)
    _, result = fit(
        dataclasses.replace(tiny_params, train=cfg),
        train_data,
        noisy_val,
        torch.device("cpu"),
        "fp32",
        show_progress=False,
    )
    losses = [s.val_loss for s in result.history]
    assert losses.index(min(losses)) == 0, losses  # the premise: epoch 1 is the best
    # ReduceLROnPlateau cuts once more than train.scheduler.patience epochs in a row were no better
    assert [s.lr for s in result.history] == pytest.approx([0.43, 0.43, 0.43, 0.215, 0.215])


def test_weight_decay_is_adamws_alone(tiny_params):
    """`train.optimizer.weight_decay` reaches AdamW (0.01 when not given, torch's default, keeps earlier
    AdamW runs as they were); Adadelta and SGD keep none, and refuse one."""
    net = Net(tiny_params.model)
    for optimizer, expected in [
        (OptimizerConfig("adamw", weight_decay=0.05), 0.05),
        (OptimizerConfig("adamw"), 0.01),
        (OptimizerConfig("sgd"), 0),
        (OptimizerConfig("adadelta"), 0),
    ]:
        cfg = dataclasses.replace(tiny_params.train, optimizer=optimizer)
        built, _ = make_optimizer(net, cfg, steps_per_epoch=1)
        assert built.param_groups[0]["weight_decay"] == expected, optimizer
    assert torch.optim.AdamW(net.parameters()).defaults["weight_decay"] == OptimizerConfig("adamw").weight_decay
    for name in ("sgd", "adadelta"):
        with pytest.raises(ConfigError, match=f"{name} takes no weight_decay"):
            OptimizerConfig(name, weight_decay=0.05)


@pytest.mark.parametrize(("monitor", "lrs"), [("val_loss", [1.0] * 6), ("val_acc", [1.0, 1.0, 1.0, 0.5, 0.5, 0.5])])
def test_plateau_follows_the_monitored_value(tiny_params, monitor, lrs):
    """The loss improves every epoch while the accuracy stalls after the first (label smoothing's
    confidence can do that): only the schedule that follows accuracy cuts the learning rate."""
    cfg = dataclasses.replace(
        tiny_params.train,
        optimizer=OptimizerConfig("sgd"),
        lr=1.0,
        scheduler=SchedulerConfig("plateau", gamma=0.5, patience=1),
        monitor=monitor,
    )
    optimizer, scheduler = make_optimizer(Net(tiny_params.model), cfg, steps_per_epoch=1)
    seen = []
    one_more_image = 100 / 12_000  # a gain of one validation image still counts as better
    epochs = [(0.50, 98.0), (0.45, 98.0), (0.40, 97.9), (0.35, 98.0), (0.30, 98.0 + one_more_image), (0.29, 98.0)]
    for val_loss, val_acc in epochs:
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step(monitor_value(cfg, val_loss, val_acc))
    assert seen == lrs


def test_diverging_training_is_a_clear_error_and_writes_nothing(project, tiny_params):
    params = parse_params(repo_params_raw(), {**TINY_OVERRIDES, "train.optimizer": "sgd", "train.lr": 1e6})
    with pytest.raises(RuntimeError, match=r"train.lr = 1000000.0: validation loss was never finite"):
        train(params, project.data, project.models, project.reports, show_progress=False)
    assert not project.models.exists() and not project.reports.exists()


def test_defaults_keep_the_seed_pipeline_unaugmented(tiny_params):
    cfg = tiny_params.train
    assert (cfg.augment_shift, cfg.augment_rotate, cfg.augment_scale, cfg.augment_elastic) == (0, 0, 0, 0)
    assert (cfg.ema_decay, cfg.processes) == (0, 1)
    net = Net(tiny_params.model)
    assert isinstance(net.bn1, torch.nn.Identity) and isinstance(net.bn2, torch.nn.Identity)


def test_random_distort_is_seeded_moves_the_ink_and_keeps_the_background(project):
    train_data, _ = load_train_val(project.data, "mnist", 0.2, 1, torch.device("cpu"))
    x = train_data.x[:32]
    background = x.amin().item()
    ranges = Distortions(shift=3, rotate=15, scale=0.1)
    moved = random_distort(x, ranges, torch.Generator().manual_seed(7), background)
    again = random_distort(x, ranges, torch.Generator().manual_seed(7), background)
    assert torch.equal(moved, again)
    assert not torch.equal(moved, random_distort(x, ranges, torch.Generator().manual_seed(8), background))
    per_image_change = (moved - x).abs().flatten(1).amax(dim=1)
    assert (per_image_change > 0.5).all()  # every image moved
    corners = moved[:, :, :2, :2]  # the digits are centred: corners stay blank, not zero-padded ink
    assert torch.allclose(corners, torch.full_like(corners, background), atol=1e-5)
    assert moved.shape == x.shape and moved.dtype == x.dtype
    # Nothing asked for, nothing moved: identity map.
    still = random_distort(x, Distortions(), torch.Generator().manual_seed(7), background)
    assert torch.allclose(still, x, atol=1e-5)


def test_shear_leans_the_strokes_and_keeps_each_row_s_ink(project):
    train_data, _ = load_train_val(project.data, "mnist", 0.2, 1, torch.device("cpu"))
    x = train_data.x[:32]
    background = x.amin().item()
    d = Distortions(shear=20)
    sheared = random_distort(x, d, torch.Generator().manual_seed(5), background)
    assert torch.equal(sheared, random_distort(x, d, torch.Generator().manual_seed(5), background))
    ink, ink_after = x - background, sheared - background
    # A horizontal shear moves pixels along their row only: every row keeps its ink, the columns do not.
    assert torch.allclose(ink_after.sum(dim=3), ink.sum(dim=3), rtol=1e-3, atol=1e-3)
    assert ((ink_after.sum(dim=2) - ink.sum(dim=2)).abs().flatten(1).amax(dim=1) > 0.1).all()
    assert Distortions(shear=1).active
    # Off, it draws nothing: rotation, scale and the two shifts take four draws per batch, as before shear
    # existed, so the random stream (and every earlier result) is unchanged.
    used, expected = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    random_distort(x, Distortions(shift=2, rotate=10, scale=0.1), used, background)
    for _ in range(4):
        torch.rand(len(x), generator=expected)
    assert torch.equal(used.get_state(), expected.get_state())


def test_erasing_blanks_one_box_in_about_the_asked_share_of_images():
    ink, background = 3.0, -0.5
    x = torch.full((2000, 1, 28, 28), ink)
    erased = random_distort(x, Distortions(erase=0.5), torch.Generator().manual_seed(3), background)
    blank = (erased - background).abs() < 1e-4
    hit = blank.flatten(1).any(dim=1)
    assert 0.45 < hit.float().mean().item() < 0.55
    assert torch.allclose(erased[~hit], x[~hit], atol=1e-5)  # the others are untouched
    for mask in blank[hit][:200, 0]:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and int(mask.sum()) == box.numel()  # one solid rectangle, nothing else blank
        assert 0.015 < box.numel() / (28 * 28) < 0.36  # 2-33% of the image, give or take rounding
    always = random_distort(x[:50], Distortions(erase=1.0), torch.Generator().manual_seed(3), background)
    assert ((always - background).abs() < 1e-4).flatten(1).any(dim=1).all()


def test_elastic_field_is_smooth_and_as_strong_as_alpha_says():
    d = Distortions(elastic_alpha=34, elastic_sigma=4)
    field = _elastic_field(256, 28, 28, d, torch.Generator().manual_seed(0), torch.device("cpu"))
    pixels = field * 14  # grid units -> pixels (28 pixels span 2 units)
    assert field.shape == (256, 28, 28, 2)
    # Uniform noise smoothed by a unit-sum Gaussian of sigma 4: std about alpha * 0.577 / (2 sqrt(pi) 4) = 1.4 px.
    assert 0.9 < pixels.std().item() < 2.2
    neighbour_step = (pixels[:, 1:] - pixels[:, :-1]).abs().mean()
    assert neighbour_step < 0.25 * pixels.abs().mean()  # smooth: neighbours move together, not pixel noise
    weaker = _elastic_field(256, 28, 28, Distortions(elastic_alpha=17), torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(weaker * 2, field, atol=1e-6)  # alpha scales the same field


def test_elastic_warp_is_seeded_and_bends_every_digit(project):
    train_data, _ = load_train_val(project.data, "mnist", 0.2, 1, torch.device("cpu"))
    x = train_data.x[:32]
    background = x.amin().item()
    d = Distortions(elastic_alpha=34, elastic_sigma=4)
    warped = random_distort(x, d, torch.Generator().manual_seed(3), background)
    assert torch.equal(warped, random_distort(x, d, torch.Generator().manual_seed(3), background))
    assert ((warped - x).abs().flatten(1).amax(dim=1) > 0.5).all()
    assert Distortions(elastic_alpha=1).active and not Distortions(elastic_sigma=2).active


def test_augmented_ema_batchnorm_training_repeats_and_saves_the_validated_average(
    project, tiny_params, tmp_path, evaluated
):
    preset = dataclasses.replace(
        tiny_params,
        model=dataclasses.replace(tiny_params.model, batchnorm=True),
        train=dataclasses.replace(
            tiny_params.train,
            augment_shift=2,
            augment_rotate=10,
            augment_scale=0.1,
            augment_elastic=34,
            ema_decay=0.9,
            epochs=2,
        ),
    )
    result = train(preset, project.data, project.models, project.reports, show_progress=False)
    again = train(preset, project.data, tmp_path, tmp_path, show_progress=False)
    assert [h.val_loss for h in result.history] == [h.val_loss for h in again.history]  # seeded: same numbers
    plain = evaluated.trained  # tiny_params, trained plain
    assert result.history[0].train_loss != plain.history[0].train_loss
    net = load_weights(preset.model, project.models / "model.pt")
    assert net.bn1.running_var.ne(1).any()  # BatchNorm statistics were learnt (and averaged)
    _, val_data = load_train_val(project.data, "mnist", 0.2, 1, torch.device("cpu"))
    val_loss, _ = loss_and_accuracy(predict_log_probs(net, val_data.x, 500), val_data.y)
    assert val_loss == pytest.approx(result.best_val_loss, rel=1e-5)  # the saved weights are those validated


def test_the_last_clean_epochs_draw_no_augmentation(project, tiny_params, monkeypatch):

    batches_per_epoch = -(-1200 // tiny_params.train.batch_size)
    distorted = []
    real = random_distort
    monkeypatch.setattr(epoch, "random_distort", lambda x, *a: distorted.append(len(x)) or real(x, *a))
    train_data, val_data = load_train_val(project.data, "mnist", 0.2, 1, torch.device("cpu"))
    for clean, augmented_epochs in ((1, 2), (0, 3)):
        distorted.clear()
        cfg = dataclasses.replace(tiny_params.train, epochs=3, augment_shift=2, augment_clean_epochs=clean)
        fit(dataclasses.replace(tiny_params, train=cfg), train_data, val_data, torch.device("cpu"), "fp32", None, False)
        assert (len(distorted), sum(distorted)) == (augmented_epochs * batches_per_epoch, augmented_epochs * 1200)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.augment_shift", -1.0, "pixels in [0, 14]"),
        ("train.augment_clean_epochs", -1, "an integer >= 0"),
        ("train.augment_scale", 1.5, "a number in [0, 1)"),
        ("train.augment_shear", 50.0, "degrees in [0, 45]"),
        ("train.augment_erase", 1.5, "a probability in [0, 1]"),
        ("train.augment_elastic", -3.0, "pixels in [0, 100]"),
        ("train.augment_elastic_sigma", 0.0, "pixels in (0, 14]"),
        ("train.ema_decay", 1.0, "a number in [0, 1) (0: off)"),
        ("train.processes", 0, "an integer >= 1"),
        ("train.monitor", "val_accuracy", "val_loss | val_acc"),
        ("model.batchnorm", "maybe", "true or false"),
        ("model.padding", 2, "0 (the seed's) or 1"),
        ("model.kernel_size", 7, "3 (the seed's) or 5"),
        ("model.dilation", 3, "1 (the seed's) or 2"),
        ("train.scheduler.gamma", 1.5, "a number in (0, 1]"),
    ],
)
def test_bad_augmentation_ema_and_process_values_name_key_and_expectation(key, value, expected):
    with pytest.raises(ConfigError, match=re.escape(f"{key} = {value!r}: expected {expected}")):
        parse_params(repo_params_raw(), {**TINY_OVERRIDES, key: value})


def test_tta_shift_moves_one_pixel_and_fills_the_background():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 5.0
    right = shift(x, 1, 0, background=-1.0)
    assert right[0, 0, 1, 2] == 5.0 and right[0, 0, 1, 1] == 0.0
    assert torch.equal(right[0, 0, :, 0], torch.full((4,), -1.0))  # the uncovered column is blank
    up = shift(x, 0, -1, background=-1.0)
    assert up[0, 0, 0, 1] == 5.0 and torch.equal(up[0, 0, 3], torch.full((4,), -1.0))
    assert shift(x, 0, 0, -1.0) is x


def test_evaluate_with_tta_scores_the_averaged_shifts(project, tiny_params, evaluated):
    shutil.copytree(evaluated.models, project.models)  # trained with tiny_params
    plain = evaluated.evaluation
    tta = dataclasses.replace(tiny_params, evaluate=dataclasses.replace(tiny_params.evaluate, tta=True))
    _, averaged = evaluate(tta, project.data, project.models, project.reports)
    assert averaged.metrics["test"]["loss"] != plain.metrics["test"]["loss"]
    assert abs(averaged.metrics["test"]["accuracy"] - plain.metrics["test"]["accuracy"]) < 10
    assert json.loads((project.reports / "metrics.json").read_text()) == averaged.metrics
