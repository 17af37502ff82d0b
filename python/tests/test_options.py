import pytest

from pyherd_worker.options import flag_pairs


def test_flags_come_in_pairs_in_order():
    assert list(flag_pairs(["--a", "1", "--b", "x y"], "prog")) == [("--a", "1"), ("--b", "x y")]
    assert list(flag_pairs([], "prog")) == []


def test_a_flag_without_its_value_ends_the_process_naming_it():
    with pytest.raises(SystemExit, match="^prog: --b needs a value$"):
        list(flag_pairs(["--a", "1", "--b"], "prog"))
