import sys

from steps.build_text.step import STEP
from steps.core.main import step_main

sys.exit(step_main(STEP))
