"""The test suite's own promise about disk use: a passed test's tmp_path is deleted at once."""
from pathlib import Path

from tests.conftest import REPO

pytest_plugins = ["pytester"]


def test_tmp_path_of_a_passed_test_is_deleted_at_once_and_of_a_failed_one_kept(pytester):
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makepyfile("""
        import pathlib

        def test_1_passes(tmp_path):
            (tmp_path / "big").write_bytes(b"x" * 1000)
            pathlib.Path("passed.txt").write_text(str(tmp_path))

        def test_2_fails(tmp_path):
            (tmp_path / "big").write_bytes(b"x" * 1000)
            pathlib.Path("failed.txt").write_text(str(tmp_path))
            assert False

        def test_3_the_passed_tests_folder_is_already_gone():
            assert not pathlib.Path(pathlib.Path("passed.txt").read_text()).exists()
    """)
    # retention "all": pytest itself would keep every folder, so what is gone was deleted by conftest
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "tmp_path_retention_policy=all")
    result.assert_outcomes(passed=2, failed=1)
    assert (Path((pytester.path / "failed.txt").read_text()) / "big").exists()
