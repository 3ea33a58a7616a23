import sys

from steps.allocate.step import STEP
from steps.core.main import step_main

sys.exit(step_main(STEP))
