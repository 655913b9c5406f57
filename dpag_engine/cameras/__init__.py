"""Camera sources a serving or recording session reads.

    cam = open_camera("opencv:/dev/video0", "wrist", fps=30, resolution=(480, 640))
    cam.start()                  # opens the device, starts its capture thread, waits for a frame
    frame = cam.latest()         # Frame(image=uint8 (H, W, 3) RGB read-only, t_capture, index)
    frame = cam.nearest(t_obs)   # the ring's frame closest to a time.monotonic() instant
    cam.stop()                   # idempotent; also `with open_camera(...) as cam:`

Each camera captures on its own daemon thread into a small ring of immutable frames stamped on the
time.monotonic() clock (a driver's own stamp converted to it where there is one), so the caller
never blocks on a device. A camera that stops delivering (grab error, end of stream, or a newest
frame older than stall_timeout_s) makes the next latest()/nearest() raise CameraFault naming the
camera, the same way a frozen robot stream faults the session.

Sources: "opencv:/dev/videoN" | "opencv:N" | "opencv:file.mp4" (opencv.py), "realsense:<serial>"
(realsense.py), "sim:<camera>" (sim.py, the emulator's rendered cameras). Source modules are
imported only when asked for, so cv2 and pyrealsense2 stay optional.
"""
from .base import Camera, CameraFault, Frame, open_camera

__all__ = ["Camera", "CameraFault", "Frame", "open_camera"]
