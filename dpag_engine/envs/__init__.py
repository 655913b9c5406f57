"""Push-T and Dynamic Push-T (gym-pusht physics), a scripted expert and a demonstration writer."""
from .dynamic_pusht import DynamicPushT, make_task
from .pusht import GOAL_POSE, MAX_STEPS, SUCCESS_COVERAGE, TEST_START_SEED, PushT, coverage, keypoints

__all__ = ["DynamicPushT", "GOAL_POSE", "MAX_STEPS", "PushT", "SUCCESS_COVERAGE", "TEST_START_SEED",
           "coverage", "keypoints", "make_task"]
