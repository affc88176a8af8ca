"""The C core on its own (tests/c/test_race.c against race.h + race.c, no Python) and the
argument checking of its CPython binding fastrace._race."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import fastrace
from fastrace import _race

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def c_compiler() -> list[str] | None:
    configured = sysconfig.get_config_var("CC")
    if configured:
        cmd = shlex.split(configured)
        if shutil.which(cmd[0]):
            return cmd
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def test_c_program_against_race_h_alone(tmp_path):
    cc = c_compiler()
    if cc is None:
        pytest.skip("no C compiler found")
    exe = tmp_path / "test_race"
    build = subprocess.run(
        cc + ["-std=c99", "-O2", "-Wall", "-ffp-contract=off", f"-I{CSRC}",
              str(ROOT / "tests" / "c" / "test_race.c"), str(CSRC / "race.c"), "-lm", "-o",
              str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all C core checks passed" in run.stdout


def test_get_include_holds_race_h():
    assert (Path(fastrace.get_include()) / "race.h").is_file()


# ------------------------------------------------------------------------------------------
# the binding checks its arguments


def structure():
    return (np.array([0, 2]), np.array([0, 1]), np.array([0, 1]), np.array([0]))


def test_binding_evaluates_a_batch_with_row_broadcasting():
    b = np.array([[0.5, 2.0], [1.0, 1.0], [0.0, 3.0]])
    s = np.array([[3.0]])
    d = np.array([[1.0]])
    rate = np.array([[1.0, 2.0]])
    got = _race.rhs(*structure(), b, s, d, rate)
    pi = b[:, 0] * b[:, 1]
    want = np.stack([b[:, 1] * (3 - pi), 2 * b[:, 0] * (3 - pi)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-15)
    np.testing.assert_allclose(_race.path_strengths(*structure(), b)[:, 0], pi)
    np.testing.assert_allclose(_race.loss(*structure(), b, s, d), -3 * pi + 0.5 * pi * pi)


@pytest.mark.parametrize("change, match", [
    (dict(b=np.array([[1.0, 2.0]], dtype=np.float32)), "b must have dtype float64"),
    (dict(b=np.ones(2)), "b must have 2 dimension"),
    (dict(b=np.ones((2, 4))[:, ::2]), "C-contiguous"),
    (dict(s=np.ones((1, 2))), "s must have 1 columns"),
    (dict(s=np.ones((3, 1))), "divides the number of systems"),
    (dict(rate=np.ones((1, 3))), "rate must have 2 columns"),
    (dict(path_edges=np.array([0, 0])), "invalid race system structure"),
    (dict(path_edges=np.array([0, 5])), "invalid race system structure"),
    (dict(path_ptr=np.array([0, 2.0])), "path_ptr must have dtype int64"),
    (dict(target_ptr=np.array([0, 1, 1])), "n_paths"),
])
def test_binding_rejects_bad_arguments(change, match):
    pp, pe, tp, tt = structure()
    args = dict(path_ptr=pp, path_edges=pe, target_ptr=tp, target_paths=tt,
                b=np.ones((2, 2)), s=np.ones((1, 1)), d=np.ones((1, 1)), rate=None)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        _race.rhs(**args)


def test_binding_checks_integrator_options():
    pp, pe, tp, tt = structure()
    b0, s, d = np.ones((1, 2)), np.ones((1, 1)), np.ones((1, 1))
    t = np.linspace(0, 1, 3)
    with pytest.raises(ValueError, match="t_end > t0"):
        _race.dopri5(pp, pe, tp, tt, b0, s, d, None, 0.0, 0.0, t, 1e-8, 1e-10, 0.0, 0.0, 10)
    with pytest.raises(ValueError, match="t_out"):
        _race.rodas3(pp, pe, tp, tt, b0, s, d, None, 0.0, 1.0, t[::-1].copy(), 1e-8, 1e-10,
                     0.0, 0.0, 10)
    with pytest.raises(ValueError, match="thresholds"):
        _race.dopri5(pp, pe, tp, tt, b0, s, d, None, 0.0, 1.0, t, 1e-8, 1e-10, 0.0, 0.0, 10,
                     np.ones(2))
    with pytest.raises(ValueError, match="record_steps"):
        _race.gd_map(pp, pe, tp, tt, b0, s, d, None, 0.1, np.array([3, 1]))
    out, events, status, stats = _race.dopri5(pp, pe, tp, tt, b0, s, d, None, 0.0, 1.0, t,
                                              1e-8, 1e-10, 0.0, 0.0, 10)
    assert out.shape == (1, 3, 2) and events.shape == (1, 1) and status[0] == _race.OK  # system-major
    assert stats.shape == (1, 3) and stats[0, 0] > 0


def test_check_values_helper():
    """_race.check_values: the front end's one-call finiteness / monotonicity check."""
    assert _race.check_values(np.array([0.0, 1.0, 2.0])) == 0
    assert _race.check_values(np.array([0.0, 1.0, 2.0]), True) == 0
    assert _race.check_values(np.array([[0.0, np.nan]])) == 1
    assert _race.check_values(np.array([0.0, -np.inf]), True) == 1
    assert _race.check_values(np.array([0.0, 1.0, 1.0]), True) == 2
    assert _race.check_values(np.array([0.0, 1.0, 1.0])) == 0
    assert _race.check_values(np.array([1, 2])) == -1  # not float64: caller checks itself
    assert _race.check_values(np.ones((2, 4))[:, ::2]) == -1  # not contiguous
    assert _race.check_values(np.empty(0), True) == 0


@pytest.mark.parametrize("t_out, ok", [
    ([0.0, 0.5, 0.5, 1.0], True),  # repeated times are allowed
    ([0.0, np.nan, 1.0], False), ([np.nan, 0.5, 1.0], False), ([0.0, 0.5, np.nan], False),
    ([np.nan], False), ([0.0, 0.7, 0.6, 1.0], False), ([-0.1, 0.5], False),
    ([0.5, 1.1], False), ([0.0, np.inf], False), ([1.0], True), ([], True),
])
def test_binding_checks_save_times(t_out, ok):
    """t_out lies in [t0, t_end] and never decreases; NaN anywhere is refused."""
    pp, pe, tp, tt = structure()
    b0, s, d = np.ones((1, 2)), np.ones((1, 1)), np.ones((1, 1))
    args = (pp, pe, tp, tt, b0, s, d, None, 0.0, 1.0, np.array(t_out, dtype=np.float64),
            1e-8, 1e-10, 0.0, 0.0, 100)
    if ok:
        assert _race.auto(*args)[2][0] == _race.OK
    else:
        with pytest.raises(ValueError, match="t_out"):
            _race.auto(*args)


@pytest.mark.parametrize("values, code", [
    ([0.0, 1.0, 2.0], 0), ([0.0, np.nan, 2.0], 1), ([np.nan, 1.0, 2.0], 1),
    ([0.0, 1.0, np.inf], 1), ([-np.inf, 0.0], 1), ([0.0, 2.0, 1.0], 2), ([0.0, 0.0], 2),
    ([3.0], 0), ([np.nan], 1), ([2.0, np.nan, 1.0], 1), ([1.0, np.inf, 2.0], 1),
])
def test_check_values_increasing_against_numpy(values, code):
    """check_values(x, True) agrees with the plain numpy definition (1 before 2)."""
    x = np.array(values)
    want = 1 if not np.isfinite(x).all() else 2 if (np.diff(x) <= 0).any() else 0
    assert want == code
    assert _race.check_values(x, True) == code
