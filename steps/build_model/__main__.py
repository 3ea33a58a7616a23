import sys

from steps.build_model.step import STEP
from steps.core.main import step_main

sys.exit(step_main(STEP))
