"""Where a DICOM instance enters, whichever the door (the node's C-STORE or the API's STOW-RS): the SOP
classes and transfer syntaxes taken, the checks with one status per failure, the file made durable and its
arrival recorded before success is answered."""
