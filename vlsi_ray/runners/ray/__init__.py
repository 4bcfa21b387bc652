"""The Ray runner: the driver (:mod:`.driver`), the teacher actors (:mod:`.teacher_pool`) and the client that
pipelines requests to them (:mod:`.client`, over :mod:`.wire`), the student's Ray Train loop
(:mod:`.train_loop`) and its DeepSpeed ZeRO stepper (:mod:`.deepspeed`).
"""
