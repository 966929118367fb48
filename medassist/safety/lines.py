"""The fixed text the code itself adds to answers, and the names of the flags. Written once: the screen, the guard,
the composer, the server and the web page all use these constants."""

DISCLAIMER = ("This information is educational and is not a diagnosis or medical advice. "
              "For advice about your own health, talk to a doctor, nurse or pharmacist.")
EMERGENCY_LINE = ("This may be a medical emergency. Call your local emergency number (such as 911 or 112) "
                  "or go to the nearest emergency department now.")
CRISIS_LINE = ("If you are thinking about suicide or harming yourself, call or text 988 (US) or your local "
               "crisis line now, or call your emergency number if you are in danger.")
DECIDE_LINE = ("Only a doctor or pharmacist who knows your health history can decide on a medicine, "
               "a dose or a schedule for you.")
DIAGNOSIS_LINE = "I can't tell what is causing your symptoms; a doctor who can examine you can."

# After a grounded answer (a retrieval index was used): one line per passage, or this when none was relevant.
SOURCE_LINE = "Source: {title} ({where})"
NO_SOURCE_LINE = "This answer is not based on a source from the collection: nothing in it matched the question well."

SCREEN_FLAGS = ("emergency", "crisis", "dosing_request", "diagnosis_request", "prompt_injection")
GUARD_FLAGS = ("dose_removed", "diagnosis_removed", "doctor_claim_removed", "contact_removed")
URGENT_FLAGS = ("emergency", "crisis")  # answered with the escalation and vetted guidance only, never generated text
CLOSING_LINES = (("dosing_request", DECIDE_LINE), ("diagnosis_request", DIAGNOSIS_LINE))
