"""bench.capacity: its command line goes through bench.run's checks (one line, exit 2, nothing written), answers
--help, and its search finds the largest value that fits (against a brute-force scan)."""

import pytest

from bench import capacity


def test_help_is_help(capsys):
    assert capacity.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("The longest context (or the largest batch) each cache fits")


@pytest.mark.parametrize(
    "args, message",
    [
        (["cache=dense"], "memory=... is needed: one or more budgets"),
        (["cache=dense", "memory=8xB"], "'8xB' is not an amount of memory"),
        (["cache=dense", "memory=8MiB", "find=width"], "find='width' is not valid; valid choices: ctx, batch"),
        (["cache=dense", "memory=8MiB", "ctx=1k"], "ctx is what the search varies"),
        (["cache=lru", "memory=8MiB"], "cache='lru' is not valid; valid choices: adakv, dense"),
        (["cache=dense,h2o", "memory=8MiB", "cache.budget=1.5"], "cache.budget=1.5 is not valid"),
        (["cache=dense", "memory=8MiB", "width=3"], "'width' is not a setting; valid settings: model, weights"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(args, message, tmp_path, capsys):
    assert capacity.main([*args, f"results_dir={tmp_path / 'results'}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: ") and message in lines[0], lines
    assert not (tmp_path / "results").exists()


class Fits:
    """A prober whose probe fits below a threshold; it records what it was asked."""

    def __init__(self, largest: int) -> None:
        self.largest, self.asked = largest, []

    def probe(self, search, value: int) -> bool:
        self.asked.append(value)
        return value <= self.largest


@pytest.mark.parametrize("largest", [0, 1024, 1500, 4095, 4096, 9000, 1 << 20])
def test_the_search_finds_the_largest_fitting_context_within_its_resolution(largest):
    """Against a brute-force scan of the multiples of 256 from 1k to the maximum: the search's answer fits, and
    nothing larger than it by more than the resolution does; every value probed is a multiple of 256."""
    search = capacity.Search(job=[], memory=1, find="ctx", label="x")
    prober, maximum = Fits(largest), 64 * 1024

    def resolution(value: int) -> int:
        return max(256, value // 64)

    found = capacity.longest(prober, search, 1024, maximum, resolution)
    fitting = [v for v in range(1024, maximum + 1, 256) if v <= largest]
    assert found == 0 if not fitting else (found <= largest and max(fitting) - found <= resolution(found))
    assert all(v % 256 == 0 for v in prober.asked)
