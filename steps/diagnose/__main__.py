import sys

from steps.core.main import step_main
from steps.diagnose.step import STEP

sys.exit(step_main(STEP))
