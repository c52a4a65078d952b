"""bench/bench_toy.py, the authors' toy table (issue 19, item 4): its reference rows say what the columns can
show at the bench's N, the mean reward comes first, and the authors' numbers stand only beside their methods."""
import bench_toy
import pytest
import torch

STEPS, N = 50, 160
OURS = "flow map, twisted (ours, default)"
AUTHORS_METHOD = "flow map, eulerian"


@pytest.fixture(scope="module")
def toy():
    rows, target_reward = bench_toy.run([STEPS], N, 1, 4, names=[AUTHORS_METHOD, OURS])
    return {name: cells for _, name, cells, _ in rows}, rows, target_reward


def test_reference_rows_are_the_floor_and_the_reweighted_base_chain(toy):
    cells, rows, target_reward = toy
    assert [name for _, name, _, _ in rows[:3]] == list(bench_toy.REFERENCE_ROWS)
    exact, base_iw, untilted = (cells[name] for name in bench_toy.REFERENCE_ROWS)
    assert exact[1] == pytest.approx(1.0) and 0 < base_iw[1] < 0.5  # ESS / N: uniform weights vs reweighting
    # Both sample the tilted law: their mean rewards agree with the target's within their Monte-Carlo error
    # (reward sd ~0.1; N 160 exact samples, ~30 effective for the reweighted chain: 4 standard errors).
    assert abs(exact[0] - target_reward) < 4 * 0.1 / N ** 0.5 + 0.005
    assert abs(base_iw[0] - target_reward) < 4 * 0.1 / (base_iw[1] * N) ** 0.5
    # No steering misses the tilt by far in mean reward, and the floor is a floor for MMD and SW2.
    assert untilted[0] < target_reward - 0.3
    assert untilted[3] > exact[3] and untilted[4] > exact[4] and untilted[5] > exact[5]


def test_mean_reward_comes_first_and_authors_numbers_only_beside_their_methods(toy):
    _, rows, target_reward = toy
    text = bench_toy.table(rows, target_reward, "test")
    header = next(line for line in text.splitlines() if line.startswith("| steps"))
    assert [c.strip() for c in header.split("|")[3:6]] == ["mean reward (ours / authors)", "target", "base + IW"]
    line = {row.split("|")[2].strip().strip("*"): row for row in text.splitlines() if row.startswith(f"| {STEPS} ")}
    theirs = bench_toy.AUTHORS[STEPS][AUTHORS_METHOD]
    assert f"/ {theirs[2]:.3f}" in line[AUTHORS_METHOD] and f"/ {theirs[0]:.3f}" in line[AUTHORS_METHOD]
    for name in (OURS, *bench_toy.REFERENCE_ROWS):  # no other method's numbers beside ours
        assert not any(f"/ {v:.3f}" in line[name] for method in bench_toy.AUTHORS[STEPS].values() for v in method)
        assert "/ —" in line[name]


def test_the_unbiased_mmd_has_no_offset_for_exact_samples():
    base = bench_toy.ring_base()
    y = bench_toy.target_samples(base, 2000)
    uniform = torch.full((400,), 1 / 400, dtype=torch.float64)
    values = torch.tensor([bench_toy.mmd_unbiased(bench_toy.target_samples(base, 400, seed=s), uniform, y)
                           for s in range(6)])
    biased = torch.tensor([bench_toy.mmd100(bench_toy.target_samples(base, 400, seed=s), uniform, y)
                           for s in range(6)])
    assert abs(float(values.mean())) < 3 * float(values.std()) / 6 ** 0.5 + 0.02, values
    assert float(biased.mean()) > 0.2  # the V-statistic's floor at N 400, which the unbiased one removes
