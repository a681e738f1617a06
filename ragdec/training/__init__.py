"""What prepares a model for a decoding method: FREE's calibration (an exit adapter on the
frozen model, ``free_calibrate``) and fine-tuning (``free_train``). Training imports
decoding; decoding never imports training, and reads what training leaves (the adapter
file, the trained folder's ``ragdec_free.json``) through ``ragdec.decoding.free``."""
