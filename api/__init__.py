"""The radiologist's API: studies, their results and images (chat and sign-off to come)."""
