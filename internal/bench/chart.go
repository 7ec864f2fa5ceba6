package bench

import (
	"bufio"
	"fmt"
	"io"
	"strings"
)

// Chart geometry (SVG user units).
const (
	chartWidth  = 960
	chartBarX   = 110 // bars start here; the side labels are left of it
	chartBarMax = 700 // longest bar
	chartBarH   = 18
	chartRowH   = 124
	chartTop    = 78
)

// Chart colours.
const (
	colOurs     = "#2f6fd0"
	colOursTick = "#173a70"
	colBase     = "#a3a3a3"
	colBaseTick = "#4d4d4d"
	colMet      = "#1d7a34"
	colMissed   = "#c0322b"
	colMuted    = "#666666"
)

// WriteChart draws the suite as a hand-written SVG: per row a group of two
// horizontal bars (ours, baseline) at their medians with a tick per sample,
// the goal as a dashed line on the scale of the ours bar (baseline median x
// goal), and the ratio, green when the goal is met and red when not.
func WriteChart(w io.Writer, r SuiteReport) error {
	bw := bufio.NewWriter(w)
	p := func(format string, args ...any) { fmt.Fprintf(bw, format, args...) }
	height := chartTop + len(r.Rows)*chartRowH + 40
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">`+"\n",
		chartWidth, height, chartWidth, height)
	p(`<rect width="100%%" height="100%%" fill="#ffffff"/>` + "\n")
	accel := strings.ToUpper(r.Host.Accel)
	if r.Host.Accel == "tcg" {
		accel = "TCG (software emulation, not hardware virtualization)"
	}
	p(`<text x="20" y="28" font-size="17" font-weight="bold">%s</text>`+"\n", esc("SmolVM benchmark suite — QEMU "+accel))
	p(`<text x="20" y="48" fill="%s">%s</text>`+"\n", colMuted, esc(fmt.Sprintf("%s, %d cores · %s · %s · %s",
		r.Host.CPU, r.Host.Cores, r.Host.QEMU, r.Host.Image, r.Host.Date)))
	p(`<text x="20" y="64" fill="%s">%s</text>`+"\n", colMuted, esc(fmt.Sprintf(
		"medians of %d rounds (clone rows: %d), ours and baseline alternating · load average %.2f at start, %.2f at end",
		r.Rounds, r.CloneRounds, r.LoadStart[0], r.LoadEnd[0])))

	for i, row := range r.Rows {
		y := chartTop + i*chartRowH
		chartRow(p, row, y)
	}

	// Legend.
	y := chartTop + len(r.Rows)*chartRowH + 14
	p(`<rect x="20" y="%d" width="14" height="10" fill="%s"/><text x="40" y="%d">ours (median)</text>`+"\n", y, colOurs, y+9)
	p(`<rect x="150" y="%d" width="14" height="10" fill="%s"/><text x="170" y="%d">baseline (median)</text>`+"\n", y, colBase, y+9)
	p(`<line x1="310" y1="%d" x2="310" y2="%d" stroke="#000" stroke-width="1.5"/><text x="318" y="%d">one sample (line: min to max)</text>`+"\n", y-1, y+11, y+9)
	p(`<line x1="500" y1="%d" x2="500" y2="%d" stroke="%s" stroke-width="2" stroke-dasharray="3,2"/><text x="508" y="%d">goal for ours (baseline median × goal)</text>`+"\n",
		y-2, y+12, colMissed, y+9)
	p("</svg>\n")
	return bw.Flush()
}

func chartRow(p func(string, ...any), row Row, y int) {
	name := strings.ReplaceAll(row.Name, "->", "→")
	p(`<text x="20" y="%d" font-size="14" font-weight="bold">%s</text>`+"\n", y+14, esc(name))
	verdict, col := "not measured", colMuted
	switch {
	case row.Skipped != "":
		verdict = "not measured: " + row.Skipped
	case row.Ratio > 0 && row.Info:
		verdict = fmt.Sprintf("%.2f×  information, no goal", row.Ratio)
	case row.Info && row.Verdict() == "info":
		verdict = fmt.Sprintf("%.1f %s  information, no baseline", row.Ours.Median, row.Unit)
	case row.Ratio > 0 && row.Met:
		verdict, col = fmt.Sprintf("%.2f×  goal ≤ %.2f×  met", row.Ratio, row.Goal), colMet
	case row.Ratio > 0:
		verdict, col = fmt.Sprintf("%.2f×  goal ≤ %.2f×  missed", row.Ratio, row.Goal), colMissed
	}
	if row.Error != "" {
		verdict += " (incomplete)"
	}
	p(`<text x="%d" y="%d" font-size="14" font-weight="bold" text-anchor="end" fill="%s">%s</text>`+"\n", chartWidth-20, y+14, col, esc(verdict))

	// One scale per row: the largest sample, median or goal mark.
	goal := row.Baseline.Median * row.Goal // 0 for an information row
	top := goal
	for _, f := range []Figure{row.Ours, row.Baseline} {
		top = max(top, f.Median)
		for _, s := range f.Samples {
			top = max(top, s)
		}
	}
	scale := func(v float64) float64 {
		if top <= 0 {
			return 0
		}
		return v / top * chartBarMax
	}
	bars := []struct {
		label      string
		f          Figure
		fill, tick string
	}{{"ours", row.Ours, colOurs, colOursTick}, {"baseline", row.Baseline, colBase, colBaseTick}}
	for k, b := range bars {
		by := y + 24 + k*(chartBarH+6)
		p(`<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", chartBarX-8, by+13, b.label)
		if len(b.f.Samples) == 0 {
			p(`<text x="%d" y="%d" fill="%s">no samples</text>`+"\n", chartBarX, by+13, colMuted)
			continue
		}
		wd := scale(b.f.Median)
		p(`<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", chartBarX, by, wd, chartBarH, b.fill)
		// The spread: a whisker from the smallest to the largest sample.
		lo, hi := float64(chartBarX)+scale(minOf(b.f.Samples)), float64(chartBarX)+scale(maxOf(b.f.Samples))
		p(`<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="1"/>`+"\n", lo, by+chartBarH/2, hi, by+chartBarH/2, b.tick)
		for _, s := range b.f.Samples {
			x := float64(chartBarX) + scale(s)
			p(`<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="1.5"/>`+"\n", x, by+2, x, by+chartBarH-2, b.tick)
		}
		end := max(wd, scale(maxOf(b.f.Samples)))
		if k == 0 {
			end = max(end, scale(goal)) // keep clear of the goal mark
		}
		p(`<text x="%.1f" y="%d">%s</text>`+"\n", float64(chartBarX)+end+6, by+13,
			esc(fmt.Sprintf("%s %s (n=%d)", num(b.f.Median), row.Unit, len(b.f.Samples))))
	}
	if goal > 0 {
		x := float64(chartBarX) + scale(goal)
		p(`<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="2" stroke-dasharray="3,2"/>`+"\n",
			x, y+20, x, y+24+chartBarH+2, colMissed)
	}
	desc := "ours: " + row.Ours.Name + "  ·  baseline: " + row.Baseline.Name
	lines := wrap(desc, 140)
	if row.Note != "" {
		lines = append(lines, wrap(row.Note, 140)...)
	}
	if row.Error != "" {
		lines = append(lines, "error: "+row.Error)
	}
	for k, l := range lines[:min(len(lines), 3)] {
		p(`<text x="%d" y="%d" font-size="11" fill="%s">%s</text>`+"\n", chartBarX, y+24+2*(chartBarH+6)+12+k*13, colMuted, esc(clip(l, 150)))
	}
}

func minOf(s []float64) float64 {
	if len(s) == 0 {
		return 0
	}
	m := s[0]
	for _, v := range s {
		m = min(m, v)
	}
	return m
}

func maxOf(s []float64) float64 {
	m := 0.0
	for _, v := range s {
		m = max(m, v)
	}
	return m
}

// num prints a figure with sensible precision.
func num(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// wrap breaks s into lines of at most n runes at spaces.
func wrap(s string, n int) []string {
	var lines []string
	cur := ""
	for _, w := range strings.Fields(s) {
		if cur != "" && len([]rune(cur))+1+len([]rune(w)) > n {
			lines = append(lines, cur)
			cur = ""
		}
		if cur != "" {
			cur += " "
		}
		cur += w
	}
	if cur != "" {
		lines = append(lines, cur)
	}
	return lines
}

func clip(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}

var xmlEscaper = strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;", "'", "&apos;")

func esc(s string) string { return xmlEscaper.Replace(s) }
