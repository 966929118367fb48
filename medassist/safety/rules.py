"""The safety layer's rules as data: regex tables that medassist/safety.py applies.

A rule is a tuple of regexes that must ALL match the normalised question or sentence (lowercase, straight
apostrophes, contractions and texting shorthands restored by medassist.safety.text.normalise). Add a case here and
a labelled example to data/safety_eval.jsonl or tests/test_safety.py; the code that applies the tables does not
change. The rules are the precise, explainable layer; the triage model (triage.py) reaches the phrasings no rule
names."""
import datetime


def _any(*alternatives: str) -> str:
    return "(" + "|".join(alternatives) + ")"


# _S{0,n}: within the same sentence.
_S = r"[^.?!;]"
_NEG = r"(won't|will not|doesn't|does not|isn't|is not|not|can't|cannot)"
_INFANT_EXACT_AGE = (r"(\b([0-9]|1[0-2]|one|two|three|four|five|six|seven|eight|nine|ten) ?(day|week|wk)s?[- ]old"
                     r"|\b([0-2]|one|two) ?months?[- ]old)")
_INFANT_AGE = "(" + _INFANT_EXACT_AGE + "|under (3|three) months)"
_INFANT_FEVER = r"(fever|temp\w*|\b3[89]([.,]\d)?\b|\bhot\b|won't (feed|eat))"

EMERGENCY_RULES = {
    "chest_pain": (_any(r"\bche?st (pain|pressure|tight\w*|hurts?|heav\w*|discomfort)",
                        r"che?st (is|feels) (tight|heavy|sore)",
                        r"(pain|pressure|tightness|heaviness|discomfort) (in|on|across) (my|his|her|their|the) che?st"),
                   r"(crush|squeez|sweat|\barm\b|jaw|\bback\b|shoulder|neck|breath|nause|faint|dizz)"),
    "gripping_chest": (r"(crushing|squeezing|elephant|clutch\w*|grabb\w*)" + _S + "{0,30}che?st",),
    "face_droop": (_any(r"(face|mouth|smile|lip)" + _S + r"{0,25}(droop\w*|sagg\w*|lopsided|uneven|crooked)",
                        r"droop\w*" + _S + "{0,20}(face|mouth|one side)"),),
    "speech": (_any(r"slurr\w*", r"(speech|words?) (is |are |came out |sound )?(slurred|jumbled|garbled)",
                    r"(speech|words|talking|voice) (is |are |sounds? )?(weird|strange|funny|odd)",
                    "trouble (speaking|talking)|suddenly can't (talk|speak)|mumbl|not making (any )?sense",
                    "(can't|cannot) (talk|speak) (properly|clearly|right)"),),
    "limb_weakness": (_any(r"(can't|cannot|unable to) (lift|move|raise|feel|use) (his|her|my|their|the) (\w+ )?"
                           r"(arm|leg|hand|side|face)",
                           r"(arm|leg|hand|side|face)" + _S + r"{0,30}(weak|numb|limp|dead)\b"),
                      "(sudden|one side|(left|right) side|on the (left|right)|speech|confus|slur|droop"
                      "|can't (talk|speak))"),
    "confusion": (_any(r"sudden\w*" + _S + "{0,30}confus", r"confus\w*" + _S + "{0,30}sudden"),),
    # Confusion with fever, fast breathing, heat or a head injury: sepsis, meningitis, heat stroke, bleeding.
    "confused_and_ill": (r"confus", r"(fever|shiver|\bhot\b|breathing (really |very |so )?fast|stiff neck|rash|vomit"
                                    r"|head (injury|knock|bump)|hit (his|her|my) head|heat|\bsun\b)"),
    "head_injury": (r"(hit|bang\w*|bump\w*|fell on|knock\w*) (\w+ ){0,2}head",
                    r"(passed out|knocked out|unconscious|vomit|confus|drowsy|seiz|won't wake|hard to wake)"),
    "fast_breathing": (r"(breathing (really |very |so )?(fast|rapidly|quickly)|rapid breathing)",
                       r"(vomit|confus|fruity|diabet|drowsy|sleepy|floppy|lips|blue)"),
    "shock": (r"(clammy|cold (hands|feet|skin))", r"(vomit|bleed|faint|pale|confus|chest|dizz|breath)"),
    "severe_belly_pain": (r"(severe|terrible|excruciating|unbearable|agoni[sz]ing|worst)" + _S
                          + "{0,30}(belly|stomach|abdom|tummy|one side)",
                          r"(vomit|faint|can't (stand|walk)|pregnan|blood|fever|rigid|hard as|dizz|collaps"
                          r"|lower right)"),
    "vision_loss": ("(lost|losing|loss of|lose|can't see|cannot see|went blind|gone blind)" + _S
                    + "{0,30}(vision|sight|eye)", r"(sudden|one eye|left eye|right eye|ago|\bjust\b)"),
    "airway_swelling": (_any(r"(throat|tongue)" + _S + r"{0,30}(swell\w*|swollen|clos\w*|tight\w*)",
                             r"(swell\w*|swollen)" + _S + "{0,15}(throat|tongue)"),),
    "allergy_signs": (r"(stung|sting|allerg|peanut|\bnuts?\b|shellfish|shrimp|\bbee\b|wasp|antibiotic|injection)",
                      _any(r"(lips?|face|eyes?) (\w+ ){0,2}(is |are )?(swell\w*|swollen|puff\w*)",
                           "wheez|faint|collaps")),
    "bleeding": (_any(r"bleed\w*" + _S + "{0,40}" + _NEG + r" (\w+ )?stop", _NEG + r" (\w+ ){0,2}stop (the )?bleeding",
                      "(bleeding|losing blood) (heavily|badly|a lot|profusely|everywhere|so much)",
                      "blood (is )?(everywhere|spurting|pouring|gushing)", "(so much|lots of|a lot of) blood",
                      "(pouring|gushing|spurting) (out|blood)", "soaked (through )?(the |a )?(towel|bandage)"),),
    "breathing": (_any(r"(can't|cannot|can not|unable to) breathe?\b", "(struggling|fighting) to breathe",
                       "gasping for (air|breath)|(trouble|difficulty|hard time) breathing|(hard|hardly) (to )?breathe",
                       "(isn't|is not|not|wasn't|stopped|barely) breathing", "breathing (weird|strange|funny|oddly)",
                       r"(lips?|face|fingers?|fingertips)" + _S + r"{0,20}\b(blue|bluish|purple|grey|gray)\b",
                       r"(barely|hardly|can barely|can hardly) breathe?\b",
                       "turning blue|blue lips|really short of breath|ribs (are )?sucking in",
                       "inhaler (isn't|is not|not|doesn't) (working|helping)"),),
    "seizure": (_any(r"seiz\w*" + _S + "{0,40}" + _NEG + " stop", r"\bseizing|convulsing",
                     r"(seiz\w*|\bfit\b|convuls\w*)" + _S + "{0,40}(still going|still happening|hasn't stopped"
                     "|not stopping)",
                     r"seiz\w*" + _S + r"{0,30}(for|over|more than|longer than) (\d+|five|six|seven|ten|several) min",
                     "(is|'s|are|been|keeps|keep) (still )?having (a )?(seizure|fit|convulsion)"),),
    "poisoning": (_any(r"overdos\w*|poisoned", r"(swallow\w*|ate|eaten|drank|drunk|drinking|ingest\w*|got into)" + _S
                       + "{0,40}(bleach|poison|antifreeze|washer fluid|detergent|cleaner|chemical|batter(y|ies)"
                       "|pesticide|weed killer|lighter fluid|paint thinner)"),),
    "too_many_pills": ("(took|taken|swallowed|ate|eaten|ingested|had|(going to|gonna|wants? to|plans? to|about to) "
                       "(take|swallow))" + _S + "{0,40}(too many|too much|a lot of|a bunch of|a handful of"
                       r"|all (of )?(my|the|his|her)|whole|entire|(bottle|packet|pack|box) of|\b\d{2,} )",
                       r"(pill|tablet|meds\b|medic|paracetamol|acetaminophen|tylenol|ibuprofen|aspirin|sleeping"
                       "|insulin|iron|vitamin|gummies|opioid|oxy|heroin|fentanyl)"),
    "child_got_pills": (r"\b(\d+ ?(year|yr|month)s?[- ]old|toddler|baby|kid|child|son|daughter|little (boy|girl))",
                        r"(swallowed|ate|eaten|got into|drank)" + _S + r"{0,30}(some|a few|several|a handful|all"
                        r"|a bunch|lots|\w+'s|my|our|the)" + _S
                        + "{0,20}(pills?|tablets?|medicine|meds|gummies|capsules?)"),
    "infant_fever": ("newborn|" + _INFANT_AGE, _INFANT_FEVER),
    "limp_child": (r"\b(baby|infant|newborn|toddler|child|kid|son|daughter|boy|girl)\b",
                   r"\b(limp|floppy|not waking|won't wake|can't wake|unresponsive)\b"),
    "thunderclap": (_any("worst headache|thunderclap", "headache" + _S + "{0,40}(exploded|explosion|out of nowhere)",
                         r"sudden\w*,? (\w+,? )?(severe|excruciating|explosive|terrible|worst) headache",
                         "headache" + _S + "{0,40}worst (\\w+ ){0,3}(of my life|ever)"),),
    "unresponsive": (_any("unconscious|unresponsive|collapsed|passed out and|(hard|difficult|impossible) to wake",
                          r"(?<!\bi )(isn't|is not|won't|will not|not) (waking|wake)\b"
                          r"(?! (up )?(early|on time|refreshed|rested|in the))",
                          r"(isn't|is not|not|won't) (responding|respond)\b(?! to)",
                          "(can't|cannot|couldn't) wake (him|her|them|my|the)"),),
    "blood_from_mouth": (_any(r"(cough|vomit|throw|puk|spit)\w* (up )?(bright red )?blood",
                              "blood in (my|his|her) (vomit|sick)"),),
    "burn": (_any("(severe|bad|big|large|deep|third[- ]degree|serious|huge) burns?", "on fire|caught fire",
                  "burn" + _S + "{0,40}(white|charred|black|leathery|all over|big|large|huge|deep|severe)"),),
    "choking": (r"(\bchoking\b(?! hazard)|choked on|stuck in (his|her|my|their) (throat|windpipe))",),
    "having_event": (r"(i'm|i am|he's|he is|she's|she is|they're|\bis) (having|going through) (a |an )?"
                     "(heart attack|stroke)",),
}
# A baby's exact age ("my 6 week old", "a 2 month old") marks a real case even in a question framing.
EMERGENCY_ALWAYS = {"infant_age_fever": (_INFANT_EXACT_AGE, _INFANT_FEVER)}

CRISIS_RULES = {
    "suicide": (_any(r"kill(ing)? (my|him|her|them)sel(f|ves)", r"take (my|his|her) own life|suicidal",
                     "end(ing)? (it all|my life|my own life|his life|her life)",
                     r"(want(s|ed)?|wanna) (to )?die\b(?! of (embar+as+|shame|laugh|bored|cringe))",
                     "no reason to live|wish i (was|were) dead",
                     r"(feel like|thinking (of|about)|want to|going to|gonna) end(ing)? it\b(?! with)",
                     r"(don't|do not|doesn't) want to (live|be alive|be here|go on|exist|wake up)\b"
                     r"(?! (with|like|in|near|there))", "better off (if i was |if i were )?dead",
                     r"(going to|gonna|wants? to|plans? to|about to|thinking (of|about)) (take|taking|swallow\w*) "
                     r"(all|a whole|the whole|an entire|every)\b", r"overdos\w* on purpose"),),
    "self_harm": (_any(r"(cut|cutting|burn|burning|hurt|hurting|harm|harming) (my|him|her|them)sel(f|ves)",
                       r"(slit|slash\w*|cut|cutting) (my|his|her|their) wrists?"),),
    # The bare topic words fire only outside study, fiction and prevention work (STUDY below).
    "topic": (r"suicid\w*|self[- ]harm\w*",),
}
# Suicide or an emergency as a subject of study, fiction or teaching, not a person at risk now.
STUDY = (r"\b(essay|homework|assignment|research\w*|students?|studying|lecture|presentation|project|novel|story"
         r"|book( club)?|film|movie|character|podcast\w*|documentary|article|course|training|teacher|class|module"
         r"|statistics|rates?|prevention|awareness|volunteer\w*|true crime|news|journalis\w*|reporting|thesis"
         r"|dissertation|memoir|nursing|media guidelines|coroners?"
         # the same in the other languages people write in (the bare topic word matches suicidio, Suizid, ...)
         r"|tesis|tesi|thèse|mémoire|hausarbeit|referat|studium|estudiando|estudo|enfermería|enfermagem"
         r"|infermieristica|recherche|ricerca|investigación|pesquisa|forschung)\b")


def _years_before(gap: int) -> str:
    """A regex for the four-digit years from 1900 to `gap` years before this one ("in 2009", not "in 2025")."""
    last = datetime.date.today().year - gap
    decades, rest = divmod(last, 10)
    full = "|".join(str(d) for d in range(190, decades))
    return rf"(({full})\d|{decades}[0-{rest}])"


# A suicide attempt or self-harm that the person says is long over, with no sign it is back: the definition's
# "self-harm now or recently" and "thoughts, plans or intent" do not cover "I self-harmed as a teenager, I'm 32 now
# and doing great". All three must hold: a time long past, a recovery said in words, and no PRESENT_RISK (the
# triage model still reads the message on its own).
RESOLVED = (
    r"\b((\d\d+|[2-9]|two|three|four|five|six|seven|eight|nine|ten|fifteen|twenty|thirty|forty|fifty|few|several"
    r"|many) (years?|yrs?|decades?) (ago|back|clean|free)|(years|decades|ages) ago|in " + _years_before(2) +
    r"|as a (teen(ager)?|student|young (wo)?man|kid|child)|in (high school|secondary school|uni|university|college"
    r"|my (teens|twenties|youth))|when i was (young|younger|a teen(ager)?|a student|\d+))\b",
    r"\b(recovered|doing (great|well|fine|good|much better)|(been|i'm|i am|feel) (well|fine|good|great|happy|stable)"
    r"|in a good place|happ(y|ily) (now|married)|(years?|yrs?|months?) clean|clean (for|since)|behind me|happy life"
    r"|been fine)\b",
)
# Words of a return or of the writer's own present state: they keep the crisis rules on in a resolved past or in a
# study framing ("for my thesis on suicide I read many cases, and honestly I am thinking about it too").
PRESENT_RISK = (r"\b(again|coming back|came back|back now|returning|lately|recently|these days|this (week|month)"
                r"|tonight|right now|anymore|any more|urges?|relaps\w*|(i'm|i am|been|i keep) thinking (of|about)"
                r"|thinking about (it|doing it)|want(s)? to (die|end)"
                r"|wanna die|plan(ning)? to|going to|gonna|struggling|i (feel|felt) like|i keep|i wish|myself too"
                r"|me too|i too|yo también|anche io|moi aussi|ich auch|eu também|mujhe bhi"
                # the definition's indirect signs
                r"|sav(e|ed|ing) (up )?(my |some |the )?(pills|tablets)|stockpil\w*"
                r"|(writ\w+|left|leave) (my |a |some )?goodbye (letters?|notes?)"
                r"|giving (my|all my) (things|stuff|belongings) away)\b")
# Animals are not human emergencies ("our dog ate a battery"); a person named beside one keeps the rules on.
ANIMAL = (r"\b(dog|dogs|puppy|cat|cats|kitten|pet|parrot|bird|budgie|hamster|rabbit|bunny|guinea pig|horse|pony|goat"
          r"|sheep|cow|calf|pig|chicken|hen|duck|fish|tortoise|turtle|snake|lizard|ferret|rat|mouse|vet)\b")
# The asker's own "I" is in nearly every message and says nothing; "me", "myself", "I'm" make the person the subject.
HUMAN = (r"\b(i'm|i am|me|myself|baby|infant|newborn|toddler|child|kid|son|daughter|boy|girl|husband|wife|partner|mum|mom"
         r"|mother|dad|father|brother|sister|friend|grandma|grandmother|grandad|grandpa|grandfather|nan|man|woman|person"
         r"|patient|colleague|neighbou?r)\b")
# Accidental injuries are not self-harm ("I cut myself while cooking").
ACCIDENT_CONTEXT = (r"(\b(while|when) (cooking|chopping|shaving|slicing|opening|gardening|working)|by accident"
                    r"|accidental|\bon (a|the|some) \w+|at the gym|paper cut|kitchen)")

# Red-flag words in an educational framing ("what are the signs of ...") are not an
# emergency unless the text also says something is happening to someone now.
EDUCATIONAL = (r"(^(what|how|why|when|which|who|where|is|are|can|could|does|do|should|would|will|tell me|explain"
               r"|describe|define|list)\b|signs of|symptoms of|warning signs|prevent|risk|\bcauses?\b|recogni[sz]e"
               r"|first aid|difference between|treated|treatment|in general)")
PERSONAL_NOW = _any(
    r"\b(i|we)('m| am| are|'re|'ve| have| feel| felt| can't| cannot| just| think| got| took| keep| ate| drank"
    r"| swallowed| started| been)\b",
    r"\b(he|she)('s| is| are| has| have| can't| won't| isn't| keeps| just| suddenly| started| took| ate| drank"
    r"| swallowed| said| says)\b",
    r"\bmy (\w+ ){0,3}(is|are|'s|has|have|can't|won't|isn't|keeps|just|feels|hurts|started|suddenly|said|says|told)\b",
    r"\b(his|her|the baby's) \w+ (is|are|has|keeps|won't|can't|isn't|went|feels|looks)\b",
    r"\b(the|our|this) (baby|child|kid|boy|girl|man|woman|patient) (is|has|'s|can't|won't|isn't)\b",
    r"\b(why (do|am|does|did) (i|my)|is it (normal|bad|serious|ok|okay|dangerous) (that|if|when|to) (i|my))\b",
    r"\b(should (i|we) (be worried|worry|go|call|wait)|do (i|we) need to (go|call))\b",
    r"\bwhat (do|should|can) (i|we) do\b(?! if (someone|somebody|a person|you|a child|a baby|an adult))",
    r"\b(myself|my life|my own life|right now|rite now|now|currently|at the moment|ago|tonight|today|since"
    r"|this (morning|afternoon|evening)|for the (last|past))\b")
# Something that happened in the past ("overdosed last year") is not an emergency now,
# unless the text also says it is happening now.
PAST = (r"\b(last (year|month|week)|(\d+|a|one|two|three|few|several|many) (years?|months?) ago|in (19|20)\d\d"
        r"|used to)\b")
NOW = r"\b(right now|now|currently|today|tonight|this (morning|afternoon|evening)|minutes ago|just|again)\b"

# Brand, generic and class names; suffixes catch many generics (amoxi-cillin, lisino-pril, ...).
MEDICINE = (r"(\b(mg|mcg|ml|tablets?|pills?|capsules?|puffs?|drops?|doses?|dosage|medicines?"
            r"|medications?|meds|drugs?|antibiotics?|antidepressants?|painkillers?|pain relievers?|steroids?|inhalers?"
            r"|insulin|ibuprofen|paracetamol|acetaminophen|tylenol|advil|motrin|aspirin|naproxen|aleve|metformin"
            r"|sertraline|zoloft|prozac|lexapro|benadryl|diphenhydramine|melatonin|prednisone|prednisolone|codeine"
            r"|tramadol|morphine|adderall|xanax|valium|warfarin|levothyroxine|zyrtec|claritin|antihistamines?|vitamins?"
            r"|supplements?|statins?|the pill|birth control|calpol|nurofen|panadol|creams?|ointments?|gels?|sprays?"
            r"|syrups?|patch(es)?|shampoos?|lotions?|laxatives?|decongestants?|antacids?|antifungals?|antivirals?"
            r"|hydrocortisone|folic acid|blood thinners?)\b"
            r"|\b\w+(cillin|mycin|pril|sartan|olol|statin|azole|dipine|oxetine|pam|lam|codone|profen|xacin|cycline"
            r"|gliptin|prazole|triptan|amide|izine|sone|olone|vir|tidine|afil|trexate|parin)\b)")
_MED_CLASS = (r"(medicine|medication|meds|drug|antibiotic|pill|tablet|painkiller|antidepressant|syrup|cream|ointment"
              r"|spray|drop|patch|inhaler)s?")
# "how much ... should I take/use" asks for a dose whatever the product is called.
_SUBJECT_TAKES = (r"\b(i|he|she|we|they|you|my \w+) (should |can |could |need to |have to |must |to )?(take|use|give"
                  r"|put|apply|inject)\b")

DOSING_RULES = {
    "how_much": (r"how (much|many|often|frequently)|how many times", MEDICINE,
                 r"(\b(should|can|could|may|safe|ok|okay|give|take|use|have|max\w*|dose)\b|too (much|many)"
                 r"|for (a|an|my|his|her|him|me)\b|per day|a day|daily|at once)"),
    "dose_words": (_any(r"what('s| is| are) (the |a )?(\w+ )?doses?\b", "(what|which) (dose|dosage|amount|strength)",
                        "how long (should|can) (i|he|she) (take|stay on|use)(?! it easy)",
                        "(right|correct|safe|usual|normal|max|maximum|most) (dose|dosage|amount)"), MEDICINE),
    "amount_to_take": ("(how (much|many|often|long)|what strength|how strong)" + _S + "{0,60}" + _SUBJECT_TAKES,),
    "prescribe": (_any("prescribe (me|him|her|us|my|something)|prescription for (me|my)|can you prescribe",
                       "(give|get|recommend|prescribe) me something (for|to)",
                       "write (me |us )?(a |an )?(prescription|script|rx)",
                       "(can i get|give me|get me|send me|i need|i want) (a |an )?(prescription|script|rx)"),),
    "can_i_take": (r"(can|should|may|could|is it (ok|okay|safe|fine) (for (me|him|her|my \w+) )?to) "
                   r"(i |we |he |she |my \w+ )?(just |still |safely )?(take|give|use|start|stop|skip|mix|combine)\b",
                   MEDICINE),
    "change": (_any("taper|wean|come off|coming off|get off|stop taking|quit taking|stop (my|his|her)",
                    "start (taking|on)|switch (from|to|my)|change (from|my)|double (my|his|her|the|it|them)",
                    r"(increase|decrease|lower|raise|halve|skip|up|bump up|reduce|cut|adjust) (my|his|her|the) (\w+ )?"
                    r"(dose|dosage|insulin|pills?|tablets?|meds|medication)",
                    "(take|give|use) (an? )?extra|extra (dose|puffs?|pills?|tablets?)"), MEDICINE),
    "which_medicine": (_any(r"(what|which) (?!(is |'s )?(the )?(difference|meaning)\b)(\w+ ){0,3}(and )?(dose|dosage)", "(tell|give) me (the |a )?(dose|dosage)",
                            r"(what|which) (\w+ ){0,2}" + _MED_CLASS + r" (should|can|do|could|would) "
                            r"(i|he|she|we|my \w+) (take|use|give|get)",
                            r"(what|which) (?!(steps?|precautions?|measures?|actions?|care|things?|foods?)\b)"
                            r"(\w+ ){1,3}(should|can|could|would) (i|he|she|we|my \w+) (take|use|give|put)",
                            "what (should|can) (i|he|she|we) (take|give) (for|to)",
                            r"(do|does) (i|we|he|she|my \w+) need (an? |some |to (take|start) )?" + _MED_CLASS,
                            r"(recommend|suggest) (me )?(a |an |some |any )?(\w+ )?" + _MED_CLASS,
                            _MED_CLASS + " (do|would|can|could) you (recommend|suggest)"),),
    "can_take_amount": ("(can|should|may|is it (ok|okay|safe) to) (i |we |he |she )?(take|give|use)" + _S
                        + r"{0,30}(\d|half|double|extra|two|more|another)", MEDICINE),
    "named_amount": (_any(r"\d+([.,]\d+)? ?(mg|mcg|ml|units?|iu|tablets?|pills?|capsules?|puffs?)\b",
                          r"\b(\d+|one|two|three|four|half an?|half) " + MEDICINE),
                     r"(too much|too little|enough|safe|\bok\b|okay|alright|should|\bcan\b|right|correct|for me"
                     r"|for my)"),
}

CONDITION = (r"(cancer\w*|tumou?r|melanoma|infect\w*|diabet\w*|shingles|chickenpox|measles|covid|strep|thyroid"
             r"|flu(?! (shot|jab|vaccine))|arthritis|allerg\w*|asthma|pregnant|depress\w*|adhd|autis\w*|heart attack"
             r"|stroke|hernia|blood clot|uti|ulcer|concussion|fracture|broken|sprain\w*|migraine|lupus|lyme|ringworm"
             r"|eczema|psoriasis|herpes|hpv|hiv|std|sti|gout|an(a)?emi\w*|sleep apnea|ibs|c(o)?eliac|gallstones?"
             r"|kidney stones?|cysts?|apnoea|sepsis|angina|arrhythmia|\w*fibrillation|heart (block|failure)|croup|cancer|dementia|\w*deficien\w+|(hypo|hyper)\w+ism|\w+itis|food poisoning|pink eye|seizure|panic attack|vertigo|sciatica|lice|scabies"
             r"|dementia|parkinson's|alzheimer's|a cold|stye|thrush|warts?|boils?|abscess|ha?emorrhoids|piles"
             r"|cold sores?|mono|impetigo|hives|croup|colic|rsv|pneumonia|whooping cough|reflux|gerd|heartburn"
             r"|anxiety|bipolar|ocd|ptsd|menopause|pcos|hypertension|intoleran\w*|\w+ (disease|syndrome|disorder)"
             r"|\w+(?<!diagn)(?<!progn)osis|\w+oma)\b")
DIAGNOSIS_RULES = {
    "do_i_have": (r"(?<!\bi )(?<!\bwe )(?<!\byou )\b(do|does|did) (i |he |she |they |we |my (\w+ ){1,3}?)"
                  r"(have|has|got)\b(?! to\b)",),
    "is_it": (r"\b(is|was) (this |that |it |these |those |(my|his|her) (\w+ ){1,3}?)(a |an )?(\w+ ){0,2}?"
              + CONDITION,),
    "could_it_be": (r"\b(could|might|would|can|may) (this |that |it |these |those |(my|his|her) (\w+ ){1,3}?)be "
                    r"(a |an )?(\w+ ){0,2}?" + CONDITION,),
    "could_i_have": (r"\b(could|might|may) (i |he |she |we |my (\w+ ){1,3}?)(have|has|be having|be getting) "
                     r"(a |an )?(\w+ ){0,2}?" + CONDITION,),
    "what_is_it": (_any(r"what (is|'s) (this|it|that)( (rash|lump|bump|spot|mole|thing|pain|swelling|mark|growth"
                        r"|bite))?\s*(\?|$)", "what could (this|it|that) be"),),
    "whats_wrong": (_any("(what('s| is)|is (there )?(something|anything)) (wrong|going on) with (me|him|her|my|us)",
                         "what('s| is| could be| might be) caus\\w* (my|his|her|this|these)",
                         r"what (do you think |could |might )?(i|he|she|they|my \w+) (have|has|got)\b(?! to\b)",
                         r"what (\w+ ){0,2}(do|does|could|might) (i|he|she|my \w+) have\b(?! to\b)"),),
    "diagnose_me": (_any(r"diagnos\w* (me|him|her|my|us|this)\b|tell me what (i|he|she) (have|has|got)",
                         r"\b(am|is) (i|he|she) (pregnant|diabetic|depressed|autistic|an(a)?emic)",
                         "(could|might|can) (i|he|she) be (pregnant|diabetic)", "does (this|that|it) (sound|look) like",
                         "does (this|that|it) mean (i|he|she) (have|has)"),),
}

INJECTION_RULES = {
    "override": (_any(r"(ignore|disregard|forget|override|bypass) (all |any |the |your |my )*(previous |prior "
                      r"|above |earlier |preceding |former |safety |system )*(instructions|rules|prompts?|guidelines"
                      r"|directions|restrictions)", "developer mode|dan mode|jailbreak|system prompt",
                      "(reveal|show|print|repeat) (me )?(your|the) (instructions|prompt|rules)"),),
    "roleplay": (_any(r"you('re| are) now\b|pretend (to be|you are|you're)|as my (doctor|physician)|role ?play as",
                      r"(act|acting|behave|respond|answer|speak) (as|like) (a|an|my|the) (\w+ )?(doctor|physician|nurse"
                      "|pharmacist|gp|psychiatrist|surgeon|clinician)"),),
    "no_disclaimer": (r"(don't|do not|no|without|skip|remove|omit|leave out|drop|stop|never) (\w+ ){0,2}"
                      r"(the |any |a |your |that )?disclaimers?",),
}

# Rules for GENERATED text, applied sentence by sentence.
_NUMBER_WORD = (r"(one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen"
                r"|eighteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|a hundred|hundred|a couple( of)?"
                r"|a few|several)")
_FRACTION = r"(half|a half|one and a half|a quarter|quarter|a third|one third|½|¼|¾|\d+/\d+)"
_COUNT = r"(\d+([.,]\d+)?|" + _NUMBER_WORD + "|" + _FRACTION + ")"
_NUM = _COUNT + r"( ?(-|–|to|or) ?" + _COUNT + ")?"
_UNIT = (r"(mg|mcg|µg|micrograms?|milligrams?|ml|mls|millilit(re|er)s?|cc|units?|iu|tablets?|tabs?|pills?|capsules?"
         r"|caps|puffs?|drops?|teaspoons?(ful)?s?|tsp|tablespoons?(ful)?s?|tbsp|spoons?(ful)?s?|sprays?|doses?"
         r"|sachets?|lozenges?|patch(es)?|suppositor(y|ies)|injections?|shots?|scoops?|capfuls?|drams?|measures?"
         r"|cups?|glass(es)?|squirts?|pumps?|applications?|ampoules?|vials?)")
# "a teaspoon", "an extra tablet": an article counts as one when a unit follows ("a dose" alone is no amount).
_AMOUNT = (r"\b(" + _NUM + r" ?-?(an? |of (a |an |the |your |these )?)?" + _UNIT
           + r"|(an?|another|an extra|one more) (?!doses?\b)" + _UNIT
           + r"|pea-sized|fingertip units?|a thin (layer|film)|a (small )?(dab|blob|squeeze))\b")
_EVERY = r"(\d+|" + _NUMBER_WORD + r"|a few|few)"
_SCHEDULE = (r"(every (" + _EVERY + r"( ?(-|to|or) ?" + _EVERY + r")? )?(hours?|days?|nights?|mornings?|evenings?"
             r"|weeks?|meal)|\b" + _EVERY + r" times (a|an|per|each) (day|week|night|hour)|twice|thrice|three times"
             r"|once (a |an |per |each )?(day|daily|week|weekly|night|hour)|at (bed ?time|night)|before (bed|meals?"
             r"|breakfast|sleep)|after (meals?|food|breakfast|dinner)|with (each |every )?meals?|in the (morning|evening)"
             r"|each (morning|night|evening)|morning and (evening|night)|night and morning|hourly|nightly|as needed"
             r"|every other day|on alternate days)")
_DURATION = (r"\b(for|over) ((no )?(longer|more) than |up to |at (least|most) |a full |the next |another )?"
             r"(" + _NUM + r"|a|an) (more )?(days?|weeks?|months?|nights?|fortnights?)\b"
             r"|\bfor (a|one|the) (full )?(week|fortnight|month)\b|\b(" + _NUM + r") ?-?(days?|weeks?) course\b")
_PER_DAY = r"(\bdaily\b|\b(a|per|each) (day|week)\b)"
_VERB = (r"\b(take|taking|took|use|using|give|giving|inject\w*|inhale|administer\w*|swallow|apply|applying|chew"
         r"|start(ed)? (on|with)|increase|decrease|double|dose|dosing|prescrib\w*|put|try|have|rub|spray|insert"
         r"|dissolve|mix|drink|sip|place|stick|up (it|the dose)|go up to|cut (it|the dose|back)|change|soak|gargle"
         r"|rinse|finish|keep taking|restart|skip)\b")
_TO_READER = (r"(\byou(r)?\b|^(take|use|give|apply|try|rub|spray|chew|swallow|start|increase|double|inject|insert"
              r"|put|dissolve|drink|have|change|soak|gargle|rinse|finish|keep|skip|restart|halve)\b"
              r"|\b(he|she|they|your \w+) (should|can|could|needs? to|must) (take|use|have))")
_SHOWN_THING = (r"(mole|rash|lump|bump|spot|pain|cough|wheeze|ache|injury|ankle|wrist|knee|eye|skin|ear|headache|swelling|mark|growth|symptoms?|bite|sore|blister"
                r"|discharge|bleeding|fever|patch|wound|cut|infection|tiredness|test results?|results?|scan|x-ray"
                r"|blood test|numbers|levels?)")
_CLINICIAN = (r"(doctor|physician|nurse|pharmacist|\bgp\b|psychiatrist|clinician|surgeon|dermatologist|cardiologist"
              r"|medical (professional|practitioner|doctor)|health ?care (professional|provider)|paediatrician"
              r"|pediatrician|cardiologist|oncologist|neurologist|gynaecologist|gynecologist|psychologist|midwife"
              r"|specialist|consultant|\bmd\b|\bdr\b)")
# Who a claim says the model is: _CLINICIAN and the other people who treat or counsel (for the guard only: the
# question rules keep _CLINICIAN), and the titles a signature ends in.
_CARER = (r"(" + _CLINICIAN[1:-1] + r"|dietitian|dietician|nutritionist|therapist|psychotherapist|counsell?or|dentist"
          r"|optometrist|physiotherapist|\bphysio|paramedic|obstetrician|\bvet|veterinarian|herbalist|homeopath"
          r"|naturopath|chiropractor|osteopath|podiatrist|radiologist|an(a)?esthetist|\bmedic|health ?care worker"
          r"|health worker|practitioner|registrar|prescriber|care provider)\b")
# Not "rn": text.normalise reads it "right now" ("Call 911, right now." is no signature).
_CREDENTIAL = (r"md|m\.d\.|mbbs|mbchb|frcp|frcs|mrcgp|pharmd|bsn|msn|dnp|np|bds|dds|dpt|rph|consultant"
               r"|(consultant|general|family|attending) (physician|practitioner|surgeon|doctor|nurse|pharmacist)"
               r"|family medicine|general practice")
# "i" as the subject, not a numeral ("type I diabetes", "stage I").
_FIRST_PERSON = r"(?<!type )(?<!stage )(?<!grade )(?<!class )(?<!phase )(?<!part )\bi"
_RELATIVE = (r"(son|daughter|child|kid|baby|boy|girl|husband|wife|partner|mum|mom|mother|dad|father|brother|sister"
             r"|grandma|grandmother|grandad|grandfather|grandpa|friend|toddler|teen|teenager|family)")
GUARD_RULES = {
    "dose_removed": {
        "amount_with_verb": (_AMOUNT, _VERB),
        "grams_with_verb": (r"\b" + _NUM + r" ?(g|grams?)\b", _VERB),
        "amount_with_schedule": (_AMOUNT, _SCHEDULE + "|" + _PER_DAY),
        "medicine_on_schedule": (MEDICINE, _VERB, _SCHEDULE + "|" + _DURATION),
        "reader_on_schedule": (_TO_READER, _VERB, r"(" + _SCHEDULE + "|" + _DURATION + r")",
                               r"(" + MEDICINE + r"|\b(it|them|one|these|this|those)\b)"),
        "amount_to_reader": (_TO_READER, r"\b(take|use|give|have|try|chew|swallow) (" + _NUM + r"|another|an extra"
                             r"|one more)\b(?! (years?|minutes?|steps?|things?|ways?|days?|weeks?|hours?))"),
        "max_amount": (r"(maximum|max|no more than|up to|not more than|at most|limit)", _AMOUNT),
        "amount_for_reader": (_AMOUNT, _TO_READER),
        "count_of_medicine": (r"\b(take|use|give|have|try|chew|swallow|finish) (" + _NUM + r"|another|an extra)"
                              r" (of )?(your |the |these |those )?" + MEDICINE,),
        "double_up": (r"\bdouble (it |them |the next one |the next dose )?up\b",),
        "dose_change": (r"\b(skip|double|halve|restart|stop|increase|decrease|reduce|lower|raise|cut) (\w+'s |your |the |a "
                        r"|one |next |this |that )*(dose|dosage|tablets?|pills?|medicine|medication|insulin)\b",
                        _TO_READER),
        "on_schedule": (_TO_READER, _VERB, r"(" + _SCHEDULE + "|" + _DURATION + r")",
                        r"(solution|salt water|mouthwash|gargle|drops|spray|patch|cream|pen|it|them)"),
    },
    "diagnosis_removed": {
        "you_have": (r"\byou (definitely |probably |most likely |clearly |likely |certainly |almost certainly |may |might "
                     r"|could |must )?(have|'ve got|have got|are having|'re having|are showing signs of|'re showing "
                     r"signs of|are experiencing|'re experiencing|suffer from|are suffering from|'re suffering from"
                     r"|have developed|'ve developed|caught|have caught|'ve caught) "
                     r"(?!(a |an |the |some )?(\w+ )?(higher|lower|greater|increased|reduced|risk|chance|likelihood)\b)"
                     r"(a |an |the |some )?(\w+ ){0,4}?" + CONDITION,),
        "relative_has": (r"\byour (\w+ ){0,2}?" + _RELATIVE + r"('s)? (\w+ ){0,2}?(has|have|has got|is showing|shows|is "
                         r"suffering from|is having|caught|has developed) ([\w,'-]+ ){0,4}?" + CONDITION,),
        "you_do_not_have": (r"\byou (do not|don't|dont) have (\w+ ){0,2}?" + CONDITION,),
        "you_are_deficient": (r"\byou('re| are) (\w+ )?(deficient|anaemic|anemic|diabetic|prediabetic|hypothyroid"
                              r"|hyperthyroid|dehydrated|in (the early stages of|heart failure|kidney failure))",),
        "describing": (r"\bwhat you('re| are) (describing|experiencing|feeling|having) (is|sounds like|sounds|looks like)"
                       r" (\w+ ){0,3}?" + CONDITION,),
        "based_on": (r"\b(based on|from|with|given) (your|these|those|the|what you)\b",
                     r"\byou (definitely |probably |likely |clearly )?(have|'ve got|are|'re)\b(?! (a |an )?"
                     r"(higher|lower|greater|increased) (risk|chance))",
                     CONDITION),
        "confident": (r"\bi('m| am) (fairly |quite |very |pretty |almost )?(confident|sure|certain|convinced)"
                      r" (that )?(this|it|you|that|your)\b",),
        "result_confirms": (r"\byour (?!(doctor|gp|nurse|pharmacist|care team|provider)\b)([\w.,'-]+ ){0,4}?(confirms?|indicates?"
                            r"|means?|shows?|suggests?|points? to|is consistent with) (that )?(you )?(have |are |'re )?"
                            r"(\w+ ){0,3}?" + CONDITION,),
        "you_are": (r"\byou('re| are) (definitely |probably |clearly |likely |most likely )?(suffering from|diabetic"
                    r"|pregnant|depressed|anaemic|anemic|asthmatic|epileptic|bipolar|autistic|allergic to)",),
        "this_is": (_any(r"\b(this|that|it) (is|'s) (definitely|clearly|certainly|surely|without doubt|for sure)\b",
                         r"\b(this|that|it|these|those)( is|'s| are) (probably|likely|most likely|almost certainly"
                         r"|very likely|typical) (?!that )(a |an )?(case of |sign of |symptoms? of )?"
                         r"(\w+ ){0,2}?(" + CONDITION + r"|\w+ (disease|syndrome|disorder))",
                         r"\b(this|that|your|the) (\w+ )?" + _SHOWN_THING + r" (is|are|'s|looks like|sounds like"
                         r"|must be|has to be) (definitely |probably |clearly |almost certainly |likely )?(a |an )?"
                         r"(sign of |case of |symptoms? of )?(\w+ ){0,2}?" + CONDITION,
                         r"\b(this|that|it) (sounds|looks|seems) (a lot |very much |exactly )?like (a |an )?(case of )?"
                         r"(\w+ ){0,2}?" + CONDITION,
                         r"\b(the|this|that|your) ((\w+ ){0,2})?" + _SHOWN_THING + r" (on|in|at|under|around|you "
                         r"found|you have|you describe)\b( [\w'-]+){0,3}? (is|are) ([\w'-]+ ){0,3}?" + CONDITION,
                         r"\b(this|that|it)( is|'s) (just|only|simply|merely|nothing more than) (a |an )?(\w+ )?"
                         + CONDITION,
                         r"\b(this|that)( is|'s) (a |an )?(simple|mild|classic|typical|harmless|nasty|bad|textbook|clear)"
                         r" (case of )?(\w+ )?" + CONDITION),),
        "sounds_like": (r"((sounds|looks|seems) like you (have|'ve got|are suffering|are having|might have|may have)"
                        r"|i (can )?diagnose you|your (symptoms|results|signs|test|tests|numbers|blood work) "
                        r"(indicate|mean|show|confirm|suggest|point to|are consistent with|are typical of|match"
                        r"|sound like|look like)|my diagnosis|i('d| would) (say|diagnose) (you|it|this)"
                        r"|(you|it) (definitely|clearly|certainly) (is|are|has|have)\b)",),
    },
    # A claim is the model speaking as someone who cares for the reader: saying it is one, signing as one, or acting
    # as one on the reader ("I'll refer you", "when I saw you in clinic"). Text ABOUT clinicians ("your doctor may
    # refer you", "I'm not a doctor") is not a claim: every rule needs the first person, a signature's shape, or an
    # examination's finding on the reader ("On examination, your abdomen is soft").
    "doctor_claim_removed": {
        "identity": (_any(r"\bi am (a |an |your |the )((?!not\b)[\w-]+ ){0,3}" + _CARER,
                          r"(?<!such )(?<!just )\b(i, )?as (a|an|your|the) ([\w-]+ ){0,2}" + _CARER + r"\b[^.;]{0,40}?"
                          r",? (i|my|we|let me|here)\b", r"\bi, as (a|an|your|the) ([\w-]+ ){0,2}" + _CARER,
                          r"\b(speaking|writing|talking|answering|say|tell you|mean) (this |that |it )?as (a|an|your"
                          r"|the) ([\w-]+ ){0,3}" + _CARER,
                          r"\b(take it from|think of me as|consider me|i am acting as|i will act as|i am here as) (a"
                          r"|an|your|the|me,? (a|an|your)) ([\w-]+ ){0,2}" + _CARER,
                          r"\bbeing (a|an) ([\w-]+ ){0,2}" + _CARER + r",? (i|my|we)\b",
                          r"\bi (have been|work as|worked as|trained as|qualified as|practi[sc]e as) (a|an) "
                          r"([\w-]+ ){0,2}" + _CARER,
                          r"\b(this is|my name is|i am|meet) (dr|doctor|nurse)\b(?!-)",
                          r"^\W*your ([\w-]+ ){0,2}" + _CARER + r",? here\b|, that is me\b"),),
        "training": (_any(r"\bin my (medical|clinical|professional) (opinion|experience|judgement|judgment|view)",
                          r"\bmy (own )?(clinical|medical|nursing) (experience|practice|training|degree|background"
                          r"|licen[cs]e)",
                          r"\bi am (licensed|qualified|board[- ]certified|registered|medically (trained|qualified)"
                          r"|fully qualified)\b(?! to (give|provide|offer|answer|help))",
                          r"\bi am trained (as|in) (a |an )?(\w+ )?(medicine|nurs\w*|doctor|surgeon|physician"
                          r"|pharmacy)",
                          r"\bi hold a licen[cs]e to practi[sc]e",
                          r"\bi have been practi[sc]ing (medicine|nursing|as|for)",
                          r"\bhaving (trained|worked|practi[sc]ed) (in|as)\b"
                          r"|\bi (trained|qualified|practi[sc]ed) (in|as) (a |an )?(\w+ )?(medicine|doctor|nurse"
                          r"|surgeon|physician)",
                          r"\bwhen i did my (residency|training|rotation|internship|house job|placement)"),),
        "practice": (_any(r"\b(my|our) patients\b|\bpatients like you|\bif you were my patient|\bpatients (ask"
                          r"|tell|come to|see) me\b|\ba patient (that |whom )?i (treated|saw|had|looked after)",
                          r"\b(i|as someone who) (have |has |had )?(treated|helped|diagnosed|examined|cared for"
                          r"|operated on) [^.;]{0,30}\b(patients|people|cases|rashes|like yours)\b|\bi have (treated"
                          r"|seen) (many |lots of |hundreds of )?patients|\bi (am |have been )?treating patients\b"
                          r"|\bmy (\w+ ){0,2}(treating|seeing|caring for) patients\b"
                          r"|\bwhen i (examine|see|treat) (patients|people)",
                          r"\b(in|into|to|at) my (practice|clinic|surgery|consulting room|ward)\b|\bmy (clinic|surgery"
                          r"|practice) is\b|\b(during|on) my (ward )?rounds\b|\bdoctor's orders\b",
                          r"\b(appointment|check-?up|consultation|visit|session) with me\b|\b(at|in|during|before"
                          r"|after) our (next |last |first |follow-up )?(appointment|consultation|session|visit)\b"
                          r"|\bour next (appointment|consultation|session|visit)\b"
                          r"|\bwelcome to (your|the|our|my) (consultation|appointment"
                          r"|clinic|surgery)\b",
                          r"\b(come back|come in|pop in|drop in|come) (and |to )?see me\b|\bsee me (again|in|next|at)\b"
                          r"|\bresults (came|come|were sent) (back )?to me\b"),),
        # the first person acting on the reader as their clinician; "i can't/cannot/am not able to" never matches
        "clinical_act": (_any(_FIRST_PERSON + r" (will |would |can |could |am going to |am |have |just |personally "
                              r"|already |also )*"
                              r"(prescrib\w*|refer(red|ring)? you|examin(e|ed|ing) (you|your)\b|order(ed|ing)? (some "
                              r"|a |an |your |the )?([\w-]+ )?(tests?|scans?|x-rays?|mri|ct|bloods)|book(ed|ing)? you"
                              r"|sign(ed|ing)?"
                              r" (you off|the form|your (\w+ )?(form|note|certificate|prescription)|a (\w+ )?(form|note"
                              r"|certificate|prescription))|renew(ed|ing)? your|discharg\w* you|authori[sz]\w* (a|your)"
                              r"|stitch|give you (the|an|a|your) (injection|jab|shot|vaccine)|do your (jabs|injection"
                              r"|bloods)|writ(e|ing) you (a|an) (\w+ )?(note|prescription|letter|referral|certificate)"
                              r"|call you with|monitor\w* your|diagnos\w*|check(ed|ing)? your (blood|pulse|temperature"
                              r"|chest|ears?|throat|eyes?|heart|lungs|skin|weight|reflexes|results?|bloods|levels|wound"
                              r"|stitches)|listened to your|take a (look at (it|that|your|you)|swab)|took (a swab|your)"
                              r"|review(ed|ing)? your (scans?|results?|x-rays?|notes|records?|bloods|tests?|case"
                              r"|history|medication|chart)|send(ing)? your (prescription|referral|results?|samples?"
                              r"|bloods|notes)"
                              r"|(increas|decreas|chang|reduc)\w* your (dose|medication|tablets)|add(ed)? (this|it) to"
                              r" your|call(ed)? in a prescription|see (from|in) your (notes|records?|chart)|see you (at"
                              r"|in|for) (your|the|clinic|surgery|my|our|a|next)\b|see you next\b|signing you off"
                              r"|admit(ting)? you|keep(ing)? you in (overnight|hospital|for))",
                              r"\blet me (examine|check) you\b|\blet me (examine|check|look at|listen to|feel) your"
                              r" (chest|throat|ears?|eyes?|skin|heart|lungs|rash|mole|wound|stitches|blood pressure"
                              r"|pulse|tummy|abdomen|stomach|back|neck|leg|arm|foot|knee|ankle|wrist|mouth|glands)\b"
                              r"|\bwhen i (saw|examined|met|treated) you\b",
                              r"i am prescribing|here is (your|a|this) prescription|\bmy prescription\b"
                              r"|\btake this prescription to\b|^\W*rx ?:"),),
        "examined_reader": (r"\b(after|when|on) examining you\b", r"\b(i|my|me)\b"),
        "examination_found": (r"\bon examination,? your (\w+ )?(is|are|was|were|looks?|seems?|feels?|sounds?)\b",),
        # a letter's signature: a sign-off, a dash and a title, or a name ending in a clinician's title
        "signature": (_any(r"^\W*(best wishes|kind regards|warm regards|warmest regards|regards|yours sincerely|yours"
                           r" faithfully|yours truly|sincerely|signed|with best wishes),",
                           r"^\W*[\u2014\u2013]\s*(dr|doctor|nurse)\b[^!?]{0,60}$",
                           r"^[a-z .'-]{2,40}(, [a-z .'-]{1,30}){0,3}, (" + _CREDENTIAL + r")\.?$",
                           r"(\bdr\.? \w+,? (md|m\.d\.)|, md\b|\bmd,? here\b|\bdr\.? \w+ here\b)"),),
    },
    # A small model invents phone numbers and e-mail addresses (MedQuAD's answers end with NIH contact lines); a
    # reader could call a wrong number instead of a real service. Numbers: guard.invented_phone (libphonenumber);
    # these patterns catch what it does not parse (vanity numbers, e-mail).
    "contact_removed": {
        "vanity": (r"\b1-8[0-8]{2}-[0-9a-z]{2,4}-?[a-z][0-9a-z]{1,5}\b",),          # 1-800-flu-shot, 1-800-92-info
        "local": (r"(call|ring|phone|dial|text|reach|contact|office|line|number)\D{0,20}\b\d{3}-\d{4}\b",),  # 555-0142
        "email": (r"\b[\w.+-]+@[\w-]+(\.[\w-]+)+\b",),
    },
}
# The guard model's dose flag counts only where something is being dosed: a medicine, a dose unit or a pronoun for
# one ("Get 30 minutes of exercise 5 days a week." reads like a schedule but doses nothing).
DOSE_OBJECT = "(" + MEDICINE + "|" + _UNIT + r"|\b(it|them|these|those|one|dose|doses|dosage|remedy|supplement)\b)"
# Regions whose number formats libphonenumber checks a generated sentence against (our readers' likely ones).
PHONE_REGIONS = ("US", "GB", "IN", "AU", "CA", "IE", "NZ", "DE", "FR", "ES", "IT", "ZA", "PH", "NG")
# Real services a reader may be told to call, as national significant numbers (no country code, no trunk 0): kept.
# Short ones (911, 112, 999, 988, 111, 000, 116 123 ...) are under seven digits and never taken for invented numbers.
REAL_SERVICES = frozenset({
    "8002221222",   # US Poison Control 1-800-222-1222
    "8002738255",   # US National Suicide Prevention Lifeline (old number, still answered)
    "8006624357",   # US SAMHSA helpline
    "8001111",      # UK Childline 0800 1111
    "8457909090",   # UK Samaritans (old number)
    "8001110111", "8001110222",  # Germany TelefonSeelsorge
    "131114",       # Australia Lifeline 13 11 14
    "18005990019",  # India KIRAN mental-health helpline
    "9152987821",   # India iCall
})
# Conditional clauses ("if you have diabetes, ...") are not diagnoses of the reader.
CONDITIONAL = r"\b(if|when|whether|unless|once|until|in case|those who|people who|anyone who|someone who)\b[^,;:]*"
