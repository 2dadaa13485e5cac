"""Heads beyond classification: regression, survival (Cox), ordinal; each loss and metric against an
independent computation on known numbers, and everything that consumes a task's outputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ips.config import TaskConfig
from ips.data.manifest import label_cells, read_manifest
from ips.errors import ConfigError, ManifestError
from ips.infer.predictions import csv_columns, prediction_rows
from ips.model.metrics import concordance_index, lower_is_better, regression_metrics, task_metrics
from ips.model.tasks import cox_terms, label_tensor, predictions, probabilities, task_loss
from ips.training.folds import _stratum
from ips.training.restarts import best_row
from ips.training.takeoff import judge_takeoff, takeoff_message

SURV = TaskConfig(name="os", kind="survival")
REG = TaskConfig(name="score", kind="regression")
HUBER = TaskConfig(name="score", kind="regression", loss="huber")
ORD = TaskConfig(name="grade", kind="ordinal", num_classes=4)


# --- Cox partial likelihood (Breslow) -----------------------------------------------------------------


def cox_by_hand(risk, time, event):
    """-sum over events of [risk_i - log sum_{j: t_j >= t_i} exp(risk_j)], written out with loops."""
    total = 0.0
    for i in range(len(risk)):
        if event[i]:
            denominator = sum(math.exp(risk[j]) for j in range(len(risk)) if time[j] >= time[i])
            total += math.log(denominator) - risk[i]
    return total


def test_cox_loss_equals_the_written_out_formula_with_ties_and_censoring():
    risk = [0.3, -1.2, 2.0, 0.0, 0.7, -0.4, 1.1]
    time = [5.0, 3.0, 3.0, 8.0, 1.0, 3.0, 8.0]  # ties at 3 (two events, one censored) and at 8
    event = [1, 1, 1, 0, 0, 1, 1]
    per_slide = cox_terms(
        torch.tensor(risk, dtype=torch.float64), torch.tensor(time), torch.tensor(event) > 0
    )
    assert per_slide.sum().item() == pytest.approx(cox_by_hand(risk, time, event), rel=1e-12)
    assert all(per_slide[i].item() == 0.0 for i in range(len(risk)) if not event[i])
    # through task_loss with the manifest's (time, event) labels: the mean over the B slides
    target = label_tensor(SURV, list(zip(time, event)))
    loss = task_loss(SURV, torch.tensor(risk, dtype=torch.float64)[:, None], target)
    assert loss.mean().item() == pytest.approx(cox_by_hand(risk, time, event) / len(risk), rel=1e-6)


def test_cox_loss_on_two_slides_by_hand():
    # slide 0 dies at t=1, slide 1 is censored at t=2: -log(e^a / (e^a + e^b))
    a, b = 0.5, -0.25
    per_slide = cox_terms(torch.tensor([a, b]), torch.tensor([1.0, 2.0]), torch.tensor([True, False]))
    assert per_slide.tolist() == pytest.approx([math.log(math.exp(a) + math.exp(b)) - a, 0.0])


def test_cox_loss_gradient_and_no_events():
    risk = torch.randn(6, requires_grad=True)
    loss = cox_terms(risk, torch.rand(6), torch.tensor([1, 0, 1, 0, 0, 1]) > 0).sum()
    loss.backward()
    assert torch.isfinite(risk.grad).all() and risk.grad.abs().sum() > 0
    none = cox_terms(torch.randn(4), torch.rand(4), torch.zeros(4, dtype=torch.bool))
    assert none.tolist() == [0.0] * 4


# --- Harrell's C --------------------------------------------------------------------------------------


def c_index_by_pairs(risk, time, event):
    concordant = comparable = 0.0
    for i, j in itertools.permutations(range(len(risk)), 2):
        if event[i] and time[i] < time[j]:
            comparable += 1
            concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


def test_c_index_counts_concordant_pairs():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(3, 40))
        risk = np.round(rng.normal(size=n), 1)  # rounding makes risk ties
        time = rng.integers(1, 10, size=n).astype(float)  # and time ties
        event = rng.integers(0, 2, size=n)
        event[0] = 1
        time[0] = 0.5  # at least one comparable pair
        assert concordance_index(risk, time, event) == pytest.approx(c_index_by_pairs(risk, time, event))


def test_c_index_known_values():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 1, 1])
    assert concordance_index(np.array([4.0, 3.0, 2.0, 1.0]), time, event) == 1.0  # earlier = riskier
    assert concordance_index(np.array([1.0, 2.0, 3.0, 4.0]), time, event) == 0.0
    assert concordance_index(np.zeros(4), time, event) == 0.5
    # censored slides only ever stand on the later side: 3 comparable pairs (0,1), (0,2), (1,2)... and none
    # from slide 3 (censored); a censored slide earlier than an event makes no pair
    assert concordance_index(np.array([3.0, 1.0, 2.0, 0.0]), time, np.array([1, 1, 0, 0])) == pytest.approx(
        c_index_by_pairs([3.0, 1.0, 2.0, 0.0], time, [1, 1, 0, 0])
    )
    assert math.isnan(concordance_index(np.zeros(3), time[:3], np.zeros(3)))


# --- regression ---------------------------------------------------------------------------------------


def test_regression_losses_by_hand():
    pred = torch.tensor([[0.0], [2.0], [-1.0], [0.5]])
    y = label_tensor(REG, [0.5, 0.0, 1.5, 0.5])
    assert task_loss(REG, pred, y).tolist() == pytest.approx([0.25, 4.0, 6.25, 0.0])
    # Huber, delta 1: e^2/2 where |e| <= 1, |e| - 1/2 beyond
    assert task_loss(HUBER, pred, y).tolist() == pytest.approx([0.125, 1.5, 2.0, 0.0])


def test_regression_metrics_against_numpy_and_by_hand():
    pred = np.array([1.0, 2.0, 2.5, 5.0, 3.0])
    y = np.array([1.5, 1.0, 3.0, 4.0, 3.0])
    m = regression_metrics(pred, y)
    assert m["mae"] == pytest.approx((0.5 + 1.0 + 0.5 + 1.0 + 0.0) / 5)
    ss_res, ss_tot = 0.25 + 1 + 0.25 + 1 + 0, float(((y - 2.5) ** 2).sum())
    assert m["r2"] == pytest.approx(1 - ss_res / ss_tot)
    assert m["pearson"] == pytest.approx(np.corrcoef(pred, y)[0, 1])
    assert m["rmse"] == pytest.approx(math.sqrt(ss_res / 5))
    perfect = regression_metrics(y, y)
    assert perfect["r2"] == 1.0 and perfect["pearson"] == pytest.approx(1.0) and perfect["mae"] == 0.0
    assert math.isnan(regression_metrics(pred, np.ones(5))["r2"])


def test_regression_task_metrics_and_c_index_of_values():
    y = label_tensor(REG, [1.0, 2.0, 3.0, 4.0])
    m = task_metrics(REG, torch.tensor([[1.0], [2.0], [4.0], [3.0]]), y)
    assert m["loss"] == pytest.approx(0.5)
    assert m["c_index"] == pytest.approx(5 / 6)  # one of the six pairs is swapped
    assert set(m) == {"loss", "mae", "rmse", "r2", "pearson", "c_index"}


def test_survival_task_metrics():
    labels = [(1.0, 1), (2.0, 0), (3.0, 1), (4.0, 1)]
    m = task_metrics(SURV, torch.tensor([[3.0], [2.0], [1.0], [0.0]]), label_tensor(SURV, labels))
    assert m["c_index"] == 1.0 and m["events"] == 3.0
    assert predictions(SURV, torch.tensor([[0.25]])).tolist() == [0.25]


# --- ordinal ------------------------------------------------------------------------------------------


def test_ordinal_loss_probabilities_and_prediction():
    logits = torch.tensor([[2.0, 0.0, -3.0], [-1.0, 1.0, 0.5]])
    y = label_tensor(ORD, [1, 3])
    # label 1: cumulative targets (1, 0, 0); label 3: (1, 1, 1)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731 - BCE with logits: softplus(-x) for 1, softplus(x) for 0
    want = [(sp(-2.0) + sp(0.0) + sp(-3.0)) / 3, (sp(1.0) + sp(-1.0) + sp(-0.5)) / 3]
    assert task_loss(ORD, logits, y).tolist() == pytest.approx(want)
    p = probabilities(ORD, logits)
    assert p.shape == (2, 4) and torch.allclose(p.sum(1), torch.ones(2)) and (p >= 0).all()
    s = torch.sigmoid(torch.tensor(2.0)).item()
    assert p[0].tolist() == pytest.approx(
        [1 - s, s - 0.5, 0.5 - torch.sigmoid(torch.tensor(-3.0)).item(), 0.047426], abs=1e-5
    )
    # slide 0: P(>0) = 0.88, P(>1) = 1/2 (not above): class 1; slide 1: P(>0) = sigmoid(-1) < 1/2:
    # class 0, whatever the later (monotonised) thresholds say
    assert predictions(ORD, logits).tolist() == [1, 0]
    m = task_metrics(ORD, logits, y)
    assert m["accuracy"] == 0.5 and m["mae"] == pytest.approx(1.5)
    assert ORD.n_outputs == 3


# --- config and manifest ------------------------------------------------------------------------------


def test_task_config_columns_and_errors():
    assert SURV.columns == ("time", "event") and SURV.n_outputs == 1
    named = TaskConfig(name="pfs", kind="survival", label_column="pfs_months", event_column="progressed")
    assert named.columns == ("pfs_months", "progressed")
    assert REG.columns == ("score",) and REG.n_outputs == 1
    with pytest.raises(ConfigError, match=r"model.tasks\[label\].loss"):
        TaskConfig(kind="binary", loss="huber")
    with pytest.raises(ConfigError, match="event_column"):
        TaskConfig(kind="regression", event_column="e")
    with pytest.raises(ConfigError, match="kind"):
        TaskConfig(kind="cox")


def _manifest(tmp_path, text):
    (tmp_path / "a.zarr").mkdir(exist_ok=True)
    (tmp_path / "b.zarr").mkdir(exist_ok=True)
    path = tmp_path / "m.csv"
    path.write_text(text)
    return path


def test_manifest_reads_time_and_event_and_regression_values(tmp_path):
    path = _manifest(tmp_path, "slide_id,path,time,event,score\na,a.zarr,12.5,1,0.25\nb,b.zarr,30,0,-1e-3\n")
    records = read_manifest(path, [SURV, REG])
    assert records[0].labels == {"os": (12.5, 1), "score": 0.25}
    assert records[1].labels == {"os": (30.0, 0), "score": -0.001}
    # the inverse: cells written back read the same
    assert label_cells(SURV, (12.5, 1)) == {"time": "12.5", "event": "1"}
    assert float(label_cells(REG, -0.001)["score"]) == -0.001


@pytest.mark.parametrize(
    ("row", "column", "match"),
    [
        ("a,a.zarr,12,2,1", "event", "not 0 \\(censored\\) or 1"),
        ("a,a.zarr,-1,1,1", "time", "negative"),
        ("a,a.zarr,soon,1,1", "time", "not a number"),
        ("a,a.zarr,3,1,nan", "score", "not a finite number"),
    ],
)
def test_manifest_bad_survival_or_regression_cells_name_the_column(tmp_path, row, column, match):
    path = _manifest(tmp_path, f"slide_id,path,time,event,score\n{row}\n")
    with pytest.raises(ManifestError, match=rf"m.csv: row 2, column '{column}': .*{match}"):
        read_manifest(path, [SURV, REG])


def test_manifest_without_event_column_names_it(tmp_path):
    path = _manifest(tmp_path, "slide_id,path,time\na,a.zarr,3\n")
    with pytest.raises(ManifestError, match="missing column 'event'"):
        read_manifest(path, [SURV])
    assert read_manifest(path, [SURV], require_labels=False)[0].labels == {}


# --- consumers: predictions, best checkpoint, folds, take-off guard ----------------------------------


def test_prediction_rows_for_regression_survival_and_ordinal():
    tasks = [REG, SURV, ORD]
    assert csv_columns(tasks) == [
        "slide_id", "task", "prob_0", "prob_1", "prob_2", "prob_3", "prediction", "label", "time", "event",
    ]  # fmt: skip
    row = prediction_rows(SURV, "s1", torch.tensor([0.75]), (12.5, 1))
    assert row == {
        "slide_id": "s1",
        "task": "os",
        "label": "",
        "prediction": "0.75",
        "time": "12.5",
        "event": "1",
    }
    row = prediction_rows(REG, "s1", torch.tensor([-2.5]), 3.25)
    assert row["prediction"] == "-2.5" and row["label"] == "3.25"
    row = prediction_rows(ORD, "s1", torch.tensor([3.0, 2.0, -2.0]), 2)
    assert row["prediction"] == "2" and row["label"] == "2" and "prob_3" in row


def test_best_checkpoint_minimises_errors_and_maximises_c_index():
    rows = [
        {"epoch": 1, "val_s/mae": 0.5, "val_s/c_index": 0.6},
        {"epoch": 2, "val_s/mae": 0.3, "val_s/c_index": 0.55},
    ]
    assert lower_is_better("val_s/mae") and lower_is_better("val_loss") and not lower_is_better("val_s/r2")
    assert best_row(rows, "val_s/mae")["epoch"] == 2
    assert best_row(rows, "val_s/c_index")["epoch"] == 1


def test_folds_stratify_survival_by_event_and_regression_not_at_all():
    assert _stratum(SURV, (12.0, 1)) == "1" and _stratum(SURV, (3.0, 0)) == "0"
    assert _stratum(REG, 0.3) == _stratum(REG, 7.0)
    assert _stratum(ORD, 2) == "2"


def _rows(key, values, split="val"):
    return [{"epoch": e, f"{split}_{key}": v} for e, v in enumerate(values, start=1)]


@pytest.mark.parametrize("task", [SURV, REG, ORD])
def test_takeoff_guard_judges_continuous_tasks_by_c_index(task):
    key = f"{task.name}/c_index"
    stalled = judge_takeoff(_rows(key, [0.5, 0.52, 0.49, 0.51]), tasks=[task], epoch=4, threshold=0.6)
    assert stalled.scores == {task.name: pytest.approx((0.52 + 0.49 + 0.51) / 3)}
    assert stalled.fired and stalled.c_index_tasks == (task.name,)
    message = takeoff_message(stalled, pretrained=True, explore=0.25, explore_novel=1.0)
    assert "val C-index" in message and "AUROC" not in message
    flying = judge_takeoff(_rows(key, [0.5, 0.7, 0.75, 0.8]), tasks=[task], epoch=4, threshold=0.6)
    assert not flying.fired
    # an AUROC key of the same task name is not what judges it
    assert (
        judge_takeoff(_rows(f"{task.name}/auroc", [0.5] * 4), tasks=[task], epoch=4, threshold=0.6).scores
        == {}
    )


def test_takeoff_message_names_both_metrics_for_mixed_tasks():
    rows = [{"epoch": 1, "val_os/c_index": 0.5, "val_label/auroc": 0.5}]
    v = judge_takeoff(rows, tasks=[SURV, TaskConfig(kind="binary")], epoch=1, threshold=0.6, window=1)
    assert set(v.stalled) == {"os", "label"}
    assert "AUROC / C-index" in takeoff_message(v, pretrained=True, explore=0.25, explore_novel=1.0)


def test_cox_fit_recovers_the_log_hazard_ratio_of_generated_data():
    """Times from a proportional-hazards model with log hazard ratio 0.8 per unit of x (exponential
    baseline, random censoring): minimising the summed Cox terms over the whole set recovers 0.8."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=gen, dtype=torch.float64)
    t_event = torch.empty(4000, dtype=torch.float64).exponential_(1.0, generator=gen) / torch.exp(0.8 * x)
    t_censor = torch.empty(4000, dtype=torch.float64).exponential_(0.3, generator=gen)
    time, event = torch.minimum(t_event, t_censor), t_event <= t_censor
    beta = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], max_iter=50)

    def closure():
        opt.zero_grad()
        loss = cox_terms(beta * x, time, event).sum() / event.sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert beta.item() == pytest.approx(0.8, abs=0.06)
    # and the C-index of the true risk beats chance by far, that of the negated risk mirrors it
    c = concordance_index(x.numpy(), time.numpy(), event.numpy())
    assert c > 0.65 and concordance_index(-x.numpy(), time.numpy(), event.numpy()) == pytest.approx(1 - c)
