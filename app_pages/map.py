"""Map: PCA / UMAP of a layer's hidden states, coloured by uncertainty; lasso a region into the curation set;
the annotation rank of the first N Label Studio tasks and how much of the unknown region they cover."""

import streamlit as st

from ka2l.errors import Ka2lError
from ka2l.ui import actions, annotate, data
from ka2l.ui.charts import colour_label, map_figure
from ka2l.ui.state import require_run

st.title("Knowledge-boundary map")
pool, run = require_run()

frame = data.scores(run["id"])
probes = actions.probes_of_run(run["id"])
best = probes[-1]["layer"] if probes else run["n_layers"]
c = st.columns(4)
layer = c[0].number_input("Layer", min_value=1, max_value=int(run["n_layers"]), value=int(best), help="The probe's chosen layer by default.")
method = c[1].selectbox("Projection", ["pca", "umap"], help="UMAP takes longer the first time; both are cached per run and layer.")
colours = [col for col in ("se", "bise", "p_unknown", "correct", "se_weighted") if col in frame and not frame[col].isna().all()]
colour = c[2].selectbox("Colour by", colours, format_func=colour_label)
contour = c[3].checkbox("Known / unknown density", value=True)

try:
    with st.spinner(f"Projecting layer {layer} with {method.upper()} (once per run and layer)..."):
        coords = actions.maps.run_projection(run["id"], int(layer), method)
except Ka2lError as exc:
    st.error(str(exc))
    st.stop()
frame = frame.assign(x=coords[:, 0], y=coords[:, 1])
figure = map_figure(frame, colour, contour)
try:
    order = annotate.annotation_order(pool["id"])
except Ka2lError as exc:
    st.error(str(exc))
    order = None
if order is not None and len(order):
    c = st.columns([1, 3])
    first_n = int(c[0].number_input("First N tasks", min_value=1, max_value=len(order), value=min(20, len(order)),
                                    help="The first N tasks annotators see in Label Studio; their questions are ringed on the "
                                         "map with their rank."))
    cov = actions.maps.rank_coverage(frame, order, first_n)
    c[1].metric(f"The first {first_n} tasks cover", f"{cov['coverage']:.0%} of the map's unknown region",
                help=f"Share of the grid cells holding unknown questions (BiSE = 1, {cov['unknown_points']} points) that "
                     f"hold one of the first {first_n} tasks' questions ({cov['on_map']} on this map; decoded candidates have "
                     "no point here). Raise the diversity on the Annotate page to spread them further.")
    st.caption(f"Annotation rank: {order.attrs['source']}.")
    annotate.rank_overlay(figure, frame, order, first_n)
event = st.plotly_chart(figure, width="stretch", on_select="rerun", selection_mode=("box", "lasso"), key="map")
points = event.selection.points if event and event.selection else []
ids = sorted({int(p["customdata"][0]) for p in points if p.get("customdata")})
st.caption(f"{len(ids)} question(s) selected with the box or lasso tool.")
if ids:
    st.dataframe(frame[frame["question_id"].isin(ids)][["question", "se", "bise"]], hide_index=True, width="stretch")
if st.button(f"Add {len(ids)} selected to the curation set", disabled=not ids):
    added = actions.curation.add(pool["id"], ids, source=f"map/run {run['id']}/layer {layer}/{method}")
    st.success(f"Added {added} new question(s); the curation set now has {len(actions.curation.member_ids(pool['id']))}.")
