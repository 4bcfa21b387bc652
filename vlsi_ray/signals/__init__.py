"""What the teacher sends the student: dense or top-k + tail log-probabilities, and their codec."""

from vlsi_ray.signals.teacher_signal import TeacherSignal, tail_logmass_from_topk

__all__ = ["TeacherSignal", "tail_logmass_from_topk"]
