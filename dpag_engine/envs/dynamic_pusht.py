"""Dynamic Push-T: Push-T with a ball that keeps rolling and bumps the T.

The paper's variant is unpublished; ours, exactly:
- ball: a pymunk disc, radius 12 px, mass 0.5 (the T's is 1), friction 0, elasticity 1;
- it moves at a constant 60 px/s (6 px per 10 Hz step) in a straight line and bounces elastically
  off the walls and the T (their elasticity is set to 1 here; pymunk multiplies the two shapes'
  values, and the agent keeps 0, so agent-T pushing is unchanged and the ball slides off the agent). Its velocity is renormalised to 60 px/s after every physics substep, exempt
  from the space's damping (which stops everything else each substep), so it never stops or speeds up;
- start: position uniform in the arena at least 100 px from the T's centre and 50 px from the
  agent, heading uniform in [0, 2 pi), both drawn from the episode seed;
- a bump moves the quasi-static T only during contact: a few px and degrees per hit.
Observations add `ball` (4,) = x, y, vx, vy (px, px/s); images show the ball in orange.
"""
from __future__ import annotations

import numpy as np
import pymunk

from .pusht import PushT

BALL_RADIUS = 12.0
BALL_MASS = 0.5
BALL_SPEED = 60.0


class DynamicPushT(PushT):
    def reset(self, seed: int) -> dict[str, np.ndarray]:
        self.env.reset(seed=int(seed))
        self._add_ball(np.random.default_rng([int(seed), 7]))
        self.steps = 0
        self.max_coverage = 0.0   # over the states after each step, as PushT's
        return self.observe()

    def _add_ball(self, rng: np.random.Generator) -> None:
        centre = np.array(self.env.block.local_to_world(self.env.block.center_of_gravity))
        while True:
            pos = rng.uniform(40, 472, size=2)
            if np.linalg.norm(pos - centre) > 100 and np.linalg.norm(pos - self.agent_pos) > 50:
                break
        heading = rng.uniform(0, 2 * np.pi)
        body = pymunk.Body(BALL_MASS, pymunk.moment_for_circle(BALL_MASS, 0, BALL_RADIUS))
        body.position = tuple(pos)
        body.velocity = (BALL_SPEED * np.cos(heading), BALL_SPEED * np.sin(heading))

        def constant_speed(b, gravity, damping, dt):
            pymunk.Body.update_velocity(b, gravity, 1.0, dt)  # ignore the space's damping of 0
            v = np.array(b.velocity)
            b.velocity = tuple(v * BALL_SPEED / max(np.linalg.norm(v), 1e-6))

        body.velocity_func = constant_speed
        shape = pymunk.Circle(body, BALL_RADIUS)
        shape.friction, shape.elasticity = 0.0, 1.0
        shape.color = (255, 140, 0, 255)
        for other in self.env.space.shapes:  # walls and the T; see the module docstring
            if other.body is not self.env.agent:
                other.elasticity = 1.0
        self.env.space.add(body, shape)
        self.ball = body

    def extra_obs(self) -> dict[str, np.ndarray]:
        return {"ball": np.array([*self.ball.position, *self.ball.velocity], dtype=np.float32)}


def make_task(name: str, render: bool = False) -> PushT:
    """'pusht' or 'dynamic_pusht'."""
    if name == "pusht":
        return PushT(render=render)
    if name == "dynamic_pusht":
        return DynamicPushT(render=render)
    raise ValueError(f"task: must be 'pusht' or 'dynamic_pusht', got {name!r}")
