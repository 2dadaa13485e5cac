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


# --- discrete-time survival ---------------------------------------------------------------------------

DISC = TaskConfig(name="os", kind="survival", loss="discrete", num_classes=3, time_bins=(2.0, 5.0))


def discrete_by_hand(logits, time, event, cuts):
    """-log of each slide's likelihood, written out: hazards h_k = 1 / (1 + e^-logit_k); the bin is the
    number of cuts at or below the time; an event there has P = h_j prod_{k<j} (1 - h_k), a censoring
    there P = prod_{k<=j} (1 - h_k)."""
    out = []
    for row, t, e in zip(logits, time, event):
        h = [1.0 / (1.0 + math.exp(-v)) for v in row]
        j = sum(1 for c in cuts if c <= t)
        p = math.prod(1.0 - h[k] for k in range(j))
        p *= h[j] if e else 1.0 - h[j]
        out.append(-math.log(p))
    return out


def test_discrete_time_loss_equals_the_written_out_likelihood():
    logits = [[0.3, -1.2, 0.8], [-0.5, 0.1, 2.0], [1.5, 0.0, -0.7], [0.2, 0.4, 0.6], [-2.0, 1.0, 0.0]]
    # times: in bin 0, on a cut (2.0: bin 1), inside bin 1, on the last cut (bin 2), beyond it
    time = [1.0, 2.0, 3.5, 5.0, 9.0]
    event = [1, 0, 1, 0, 1]
    got = task_loss(
        DISC, torch.tensor(logits, dtype=torch.float64), label_tensor(DISC, list(zip(time, event)))
    )
    assert got.tolist() == pytest.approx(discrete_by_hand(logits, time, event, (2.0, 5.0)), rel=1e-6)
    # one case by hand: slide 0, an event in bin 0, is -log sigmoid(0.3)
    assert got[0].item() == pytest.approx(math.log(1 + math.exp(-0.3)), rel=1e-6)


def test_discrete_time_risk_is_minus_the_expected_bins_survived():
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5]], dtype=torch.float64)
    # hazards 1/2: survival 1/2, 1/4, 1/8 -> risk -(7/8)
    risk = probabilities(DISC, logits)
    assert risk[0].item() == pytest.approx(-0.875)
    h = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.5)]
    s1 = 1 - h[0]
    assert risk[1].item() == pytest.approx(-(s1 + s1 * (1 - h[1]) + s1 * (1 - h[1]) * (1 - h[2])))
    assert torch.equal(predictions(DISC, logits), risk)
    # the C-index comes from the risk: a higher early hazard ranks first
    labels = [(1.0, 1), (2.0, 0), (3.0, 1), (4.0, 1)]
    m = task_metrics(
        DISC, torch.tensor([[3.0, 0, 0], [2.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0]]), label_tensor(DISC, labels)
    )
    assert m["c_index"] == 1.0 and m["events"] == 3.0


def test_time_bins_are_quantiles_of_the_event_times():
    from ips.model.tasks import event_time_quantiles, with_time_bins

    times = [1, 2, 3, 4, 5, 6, 7, 8, 100, 200]
    events = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]  # the censored 100 and 200 do not move the cuts
    assert event_time_quantiles(times, [e > 0 for e in events], 4) == pytest.approx((2.75, 4.5, 6.25))
    with pytest.raises(ValueError, match="distinct"):
        event_time_quantiles([1, 1, 1, 1], [True] * 4, 3)

    class Rec:
        def __init__(self, t, e):
            self.labels = {"os": (float(t), e)}

    task = TaskConfig(name="os", kind="survival", loss="discrete", num_classes=4)
    assert task.n_outputs == 4
    (done,) = with_time_bins([task], [Rec(t, e) for t, e in zip(times, events)])
    assert done.time_bins == pytest.approx((2.75, 4.5, 6.25)) and done.n_outputs == 4
    with pytest.raises(ConfigError, match=r"model.tasks\[os\].num_classes"):
        with_time_bins([task], [Rec(1, 1)] * 5)
    with pytest.raises(ConfigError, match="time_bins"):
        TaskConfig(name="os", kind="survival", loss="discrete", num_classes=3, time_bins=(5.0, 2.0))
    with pytest.raises(ConfigError, match="loss"):
        TaskConfig(name="os", kind="survival", loss="huber")


def test_discrete_time_fit_recovers_generated_hazards():
    """Exponential times with rate exp(x) for x in {0, 1}, censored at random: minimising the summed
    likelihood over the whole set recovers each group's per-bin hazard, 1 - exp(-rate * bin width)
    (memoryless), and the high-rate group's risk is the higher."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.arange(4000) % 2).to(torch.float64)
    t_event = torch.empty(4000, dtype=torch.float64).exponential_(1.0, generator=gen) / torch.exp(x)
    t_censor = torch.empty(4000, dtype=torch.float64).exponential_(0.2, generator=gen)
    time, event = torch.minimum(t_event, t_censor), t_event <= t_censor
    cuts = (0.5, 1.0)
    task = TaskConfig(name="os", kind="survival", loss="discrete", num_classes=3, time_bins=cuts)
    table = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)  # logits per group and bin
    opt = torch.optim.LBFGS([table], max_iter=100)
    target = torch.stack([time, event.to(torch.float64)], dim=1)

    def closure():
        opt.zero_grad()
        loss = task_loss(task, table[x.long()], target).sum()
        loss.backward()
        return loss

    opt.step(closure)
    hazard = torch.sigmoid(table.detach())
    for g in (0, 1):
        rate = math.exp(g)
        for k in (0, 1):  # bins of width 0.5
            assert hazard[g, k].item() == pytest.approx(1 - math.exp(-rate * 0.5), abs=0.03)
    risk = probabilities(task, table.detach())
    assert risk[1] > risk[0]
