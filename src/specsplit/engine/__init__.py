"""Engine: the speculation loop for one request and the choice of draft length."""
