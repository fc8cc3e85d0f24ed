import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    group = parser.getgroup("rnndsl")
    group.addoption("--fuzz-specs", type=int, default=0,
                    help="differential fuzzer: run this many generated specs (default: as many "
                         "as fit in --fuzz-seconds)")
    group.addoption("--fuzz-seconds", type=float, default=60.0,
                    help="differential fuzzer: time box of the default batch")
    group.addoption("--fuzz-seed", type=int, default=0, help="differential fuzzer: first seed")
