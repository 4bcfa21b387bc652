"""Ray actors: the teacher pool (teacher.py), the client that hides the transport (client.py) and the
student's Ray Train loop (student.py)."""
