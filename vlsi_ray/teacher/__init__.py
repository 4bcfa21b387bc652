"""The teacher as step 2 sees it: one ``batch -> TeacherSignal`` source, whatever serves it (:mod:`.sources`)."""
