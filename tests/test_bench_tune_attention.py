"""tune_attention's host side: which cases a run may measure, and how its rows go into the table."""

import pytest

from fused_moonvit.benchmarks.tune_attention import CASES, main, merge_table


def row(cls, head_dim, budget, backend):
    return {"device_class": cls, "head_dim": head_dim, "max_budget": budget, "cases": [],
            "ranking": [{"backend": backend, "total_us": 1.0}]}


def test_a_run_of_some_budgets_keeps_the_other_rows_and_their_run():
    earlier = {"device_class": "sm90", "date": "2026-12-06", "command": "first"}
    table = {"measured": {"sm90": earlier, "sm80": {"date": "x"}},
             "rows": [row("sm90", 72, 1024, "triton"), row("sm90", 72, 16384, "fa3"), row("sm90", 128, 16384, "fa3"),
                      row("sm80", 72, 16384, "fa2")]}
    run = {"device_class": "sm90", "date": "2026-12-07", "command": "second"}
    merge_table(table, [row("sm90", 72, 16384, "gluon")], run)
    got = {(r["device_class"], r["head_dim"], r["max_budget"]): r for r in table["rows"]}
    assert sorted(got) == [("sm80", 72, 16384), ("sm90", 72, 1024), ("sm90", 72, 16384), ("sm90", 128, 16384)]
    assert got[("sm90", 72, 16384)]["ranking"][0]["backend"] == "gluon"
    assert got[("sm90", 72, 16384)]["date"] == "2026-12-07"
    assert got[("sm90", 128, 16384)]["ranking"][0]["backend"] == "fa3" and "date" not in got[("sm90", 128, 16384)]
    assert table["measured"]["sm90"]["command"] == "second"
    assert table["measured"]["sm90"]["other_rows"] == earlier
    assert table["measured"]["sm80"] == {"date": "x"}


def test_a_run_of_every_row_keeps_no_earlier_run():
    table = {"measured": {"sm90": {"device_class": "sm90", "date": "old"}}, "rows": [row("sm90", 72, 1024, "triton")]}
    merge_table(table, [row("sm90", 72, 1024, "gluon")], {"device_class": "sm90", "date": "new"})
    assert table["measured"]["sm90"] == {"device_class": "sm90", "date": "new"}
    assert [r["ranking"][0]["backend"] for r in table["rows"]] == ["gluon"]


def test_cases_must_cover_whole_budgets(capsys):
    shared = [n for n in CASES if CASES[n][0] == CASES["1x16384"][0] and n != "1x16384"]
    assert shared, "the 16384 budget has several cases"
    with pytest.raises(SystemExit) as exc:
        main(["--cases", "1x16384", "--out", "/tmp"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "leaves out" in err and all(n in err for n in shared)


def test_unknown_case_is_named(capsys):
    with pytest.raises(SystemExit):
        main(["--cases", "1x999"])
    assert "unknown cases ['1x999']" in capsys.readouterr().err


def test_unknown_backend_is_named(capsys):
    with pytest.raises(SystemExit):
        main(["--backends", "gluon,fa4"])
    assert "--backends: choose from" in capsys.readouterr().err


def test_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--rounds", "0", "--cases", "1x256"])
    assert exc.value.code == 2
    assert "--rounds" in capsys.readouterr().err
